"""pallas_kernels is standalone: it must never import kimi_jax."""

import subprocess
import sys

from helpers.paths import REPO


def test_no_kimi_jax_imports_in_source():
  for path in (REPO / "pallas_kernels").rglob("*.py"):
    text = path.read_text()
    assert "import kimi_jax" not in text and "from kimi_jax" not in text, path


def test_import_does_not_load_kimi_jax():
  code = "import sys, pallas_kernels; assert not any(m.startswith('kimi_jax') for m in sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
