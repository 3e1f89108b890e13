"""colab/quickstart.ipynb: committed without outputs, linked from the README, and (slow) run top to bottom.

The slow test executes the notebook headlessly with nbclient in a kernel on this interpreter, on CPU, with a
shortened run (the KIMI_QUICKSTART_* variables its first code cell reads); any cell error fails it.

    .venv/bin/python -m pytest tests/colab/test_colab.py -m slow -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import sys

from helpers.paths import REPO
import pytest

NOTEBOOK = REPO / "colab" / "quickstart.ipynb"
KERNEL = "kimi-jax-test"
RUN = {
  "KIMI_QUICKSTART_STEPS": "12",
  "KIMI_QUICKSTART_BATCH_SIZE": "4",
  "KIMI_QUICKSTART_SEQ_LEN": "32",
  "KIMI_QUICKSTART_NEW_TOKENS": "16",
}


def _notebook() -> dict:
  return json.loads(NOTEBOOK.read_text())


def _code_cells(nb: dict) -> list[str]:
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_committed_clean():
  nb = _notebook()
  assert nb["nbformat"] == 4
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook with outputs cleared"
  first = _code_cells(nb)[0]
  for name in RUN:
    assert name in first, f"the first code cell should read {name}"
  # The pip install only runs in Colab: locally the notebook must use the checkout it is tested with.
  assert 'if "google.colab" in sys.modules:' in first
  install = [line for line in first.splitlines() if "pip" in line]
  assert install and all(line.startswith((" ", "if ")) for line in install), install


def test_readme_links_notebook():
  assert "colab/quickstart.ipynb" in (REPO / "README.md").read_text()


def _kernelspec(root: Path) -> Path:
  """A kernelspec for this interpreter under root/kernels (JUPYTER_PATH=root), whatever else is installed."""
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kimi-jax test",
        "language": "python",
      }
    )
  )
  return root


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
  for module in ("nbformat", "nbclient", "ipykernel"):
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[notebook]')")
  import nbclient
  import nbformat

  workdir = tmp_path / "run"
  monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(tmp_path / "jupyter")))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel then draws figures inline (image/png)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("KIMI_QUICKSTART_WORKDIR", str(workdir))
  for name, value in RUN.items():
    monkeypatch.setenv(name, value)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb, kernel_name=KERNEL, timeout=1200, allow_errors=False, resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError on the first failing cell

  text = "\n".join(
    out.get("text", "")
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.outputs
    if out.get("output_type") == "stream"
  )
  steps = int(RUN["KIMI_QUICKSTART_STEPS"])
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == steps  # log_every=1
  assert (workdir / "model" / "config.json").is_file()
  assert "after reloading equal those before saving" in text
  assert "And God said, " in text  # the generated samples were printed
  images = [
    out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if "image/png" in out.get("data", {})
  ]
  assert images, "the loss / max-logit figure was not drawn"
