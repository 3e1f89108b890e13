"""kimi_jax.backend: the one place `auto` is resolved and Pallas options are chosen, for the compile target."""

import ast
import pathlib
import subprocess
import sys

from helpers.paths import REPO
import pytest

from kimi_jax import backend, config
from kimi_jax.backend import pallas_options, platform, resolve, target_platform

# Written out here rather than read from backend.AUTO, so that a change to the table has to change this test.
EXPECTED_AUTO = {
  ("moe", "cpu"): "blocked",
  ("moe", "tpu"): "pallas",
  ("moe", "gpu"): "ragged",
  ("attention", "cpu"): "xla",
  ("attention", "tpu"): "pallas",
  ("attention", "gpu"): "xla",
  ("newton_schulz", "cpu"): "xla",
  ("newton_schulz", "tpu"): "pallas",
  ("newton_schulz", "gpu"): "xla",
  ("expert_parallel", "cpu"): "all_to_all",
  ("expert_parallel", "tpu"): "ragged_all_to_all",
  ("expert_parallel", "gpu"): "ragged_all_to_all",
}


@pytest.mark.parametrize("kind,target", sorted(EXPECTED_AUTO))
def test_auto_table(kind, target):
  with target_platform(target):
    assert platform() == target
    assert resolve(kind, "auto") == EXPECTED_AUTO[kind, target]
    for choice in backend.CHOICES[kind]:  # explicit choices pass through on every platform
      assert resolve(kind, choice) == choice


def test_every_kind_is_in_the_table():
  assert set(backend.CHOICES) == {kind for kind, _ in EXPECTED_AUTO} == set(backend.AUTO)
  for kind, row in backend.AUTO.items():
    assert set(row) == set(backend.PLATFORMS) and set(row.values()) <= set(backend.CHOICES[kind])


def test_config_accepts_exactly_the_backend_choices():
  assert ("auto", *backend.CHOICES["moe"]) == config.MOE_IMPLS
  assert ("auto", *backend.CHOICES["attention"]) == config.ATTENTION_IMPLS


@pytest.mark.parametrize("kind", sorted(backend.CHOICES))
def test_unknown_choice_names_the_kind_and_its_choices(kind):
  with pytest.raises(ValueError) as err:
    resolve(kind, "fastest")
  message = str(err.value)
  assert "'fastest'" in message and kind in message and "'auto'" in message
  assert all(repr(choice) in message for choice in backend.CHOICES[kind]), message


def test_unknown_kind_is_named():
  with pytest.raises(ValueError, match="unknown kind 'flash'.*'moe'"):
    resolve("flash", "auto")


def test_target_platform_changes_every_auto_choice():
  """An AOT compile for TPU on a CPU host picks the TPU choice of every kind; contexts nest and unwind."""
  with target_platform("cpu"):
    on_cpu = {kind: resolve(kind, "auto") for kind in backend.CHOICES}
    with target_platform("tpu"):
      on_tpu = {kind: resolve(kind, "auto") for kind in backend.CHOICES}
      assert pallas_options() == {"impl": "tpu"}
    assert {kind: resolve(kind, "auto") for kind in backend.CHOICES} == on_cpu
  assert all(on_tpu[kind] != on_cpu[kind] for kind in backend.CHOICES), (on_cpu, on_tpu)


def test_pallas_options_per_platform():
  with target_platform("tpu"):
    assert pallas_options() == {"impl": "tpu"}
  with target_platform("gpu"):
    assert pallas_options() == {"impl": "gpu"}
    assert pallas_options(native=("tpu",)) == {"impl": "tpu", "interpret": True}  # a TPU-only kernel
  with target_platform("cpu"):
    assert pallas_options() == {"impl": "tpu", "interpret": True}


def test_cuda_and_rocm_read_gpu():
  for name in ("cuda", "rocm"):
    with target_platform(name):
      assert platform() == "gpu" and pallas_options() == {"impl": "gpu"}
      assert resolve("moe", "auto") == "ragged"


def _recorded_muon_clip_kwargs(monkeypatch, **overrides) -> dict:
  """Builds the optimizer as training does and returns the keyword arguments it gave muon_clip."""
  from kimi_jax.train_config import base_config, model_config
  from kimi_jax.training import optimizer

  seen = {}

  def record(*args, **kwargs):
    seen.update(kwargs)
    return optimizer.optax.identity()

  monkeypatch.setattr(optimizer, "muon_clip", record)
  c = base_config("tiny")
  c.update(optimizer="muon_clip", **overrides)
  optimizer.build_optimizer(c, model_config(c))
  return seen


def test_trainer_passes_an_explicit_newton_schulz_choice_for_the_target(monkeypatch):
  """muon's own `auto` asks this host's backend; the trainer resolves c.muon_ns_impl for the compile target."""
  with target_platform("tpu"):
    kw = _recorded_muon_clip_kwargs(monkeypatch, muon_ns_impl="auto")
  assert (kw["ns_impl"], kw["ns_interpret"]) == ("pallas", False)
  for target in ("cpu", "gpu"):
    with target_platform(target):
      kw = _recorded_muon_clip_kwargs(monkeypatch, muon_ns_impl="auto")
    assert (kw["ns_impl"], kw["ns_interpret"]) == ("xla", False)
    with target_platform(target):  # an explicit pallas runs the TPU-only kernel interpreted
      kw = _recorded_muon_clip_kwargs(monkeypatch, muon_ns_impl="pallas")
    assert (kw["ns_impl"], kw["ns_interpret"]) == ("pallas", True)
  with pytest.raises(ValueError, match="Newton–Schulz impl 'fused'"):
    _recorded_muon_clip_kwargs(monkeypatch, muon_ns_impl="fused")


def test_optim_stays_standalone():
  """kimi_jax.optim (jax + optax only) reaches no other kimi_jax module, kimi_jax.backend included."""
  code = "import sys, kimi_jax.optim; print(' '.join(m for m in sys.modules if m.startswith('kimi_jax')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
  loaded = out.stdout.split()
  assert loaded and all(m == "kimi_jax" or m.startswith("kimi_jax.optim") for m in loaded), loaded


def _kimi_jax_imports(path: pathlib.Path) -> set[str]:
  """The kimi_jax modules a source file imports (at any depth in the file)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return {n for n in names if n == "kimi_jax" or n.startswith("kimi_jax.")}


def test_layering():
  """backend and chips are bottom-level; only the CLIs in kimi_jax/tools import kimi_jax.tools."""
  package = REPO / "kimi_jax"
  assert _kimi_jax_imports(package / "backend.py") == set()
  assert _kimi_jax_imports(package / "chips.py") == set()
  for path in package.rglob("*.py"):
    if path.parent.name != "tools":
      tools = {n for n in _kimi_jax_imports(path) if n.startswith("kimi_jax.tools")}
      assert not tools, f"{path.relative_to(REPO)} imports {sorted(tools)}"
