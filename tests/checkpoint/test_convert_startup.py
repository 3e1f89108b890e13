"""The conversion's start-up work: the host decode programs it compiles ahead (from the shard headers, on a thread
of its own) are exactly those its pieces run, and the output does not depend on who compiled them; the CLI keeps
them in a persistent compilation cache."""

import os
import subprocess
import sys
import threading

from builders.synthetic import write_synthetic
import pytest

from kimi_jax.checkpoint import convert, orbax_arrays, quant
from kimi_jax.checkpoint.hf import HFCheckpoint
from kimi_jax.config import tiny


@pytest.fixture
def compiled(monkeypatch):
  """An empty program table (programs other tests compiled would hide what this one compiles); yields the list of
  (program, thread name) compiled during the test."""
  done = []
  compile_ = quant._compile

  def recording(program):
    done.append((program, threading.current_thread().name))
    return compile_(program)

  monkeypatch.setattr(quant, "_PROGRAMS", {})
  monkeypatch.setattr(quant, "_compile", recording)
  return done


def _arrays(out_dir) -> dict:
  state = os.path.join(out_dir, "state")
  ctx = orbax_arrays.context()
  return {
    p: orbax_arrays.open_array(state, p, ctx).read().result().tobytes() for p in orbax_arrays.read_tree_paths(state)
  }


class _NoPrecompiler:
  def __init__(self, programs):
    pass

  def close(self):
    pass


@pytest.mark.parametrize(("fmt", "dtype"), [("fp8", "bfloat16"), ("fp8", "float32"), ("int4", "bfloat16")])
def test_precompiled_programs_are_the_ones_pieces_run(fmt, dtype, tmp_path, compiled, monkeypatch):
  """decode_programs lists, from the headers alone, every program the pieces run (whole and partial row blocks),
  each once and nothing else; with the Precompiler, each is compiled once (mostly on its thread) and the
  checkpoint is the same bit for bit."""
  hf = str(tmp_path / "hf")
  write_synthetic(hf, tiny(), fmt, max_shard_bytes=1 << 20)
  ckpt = HFCheckpoint(hf)
  piece_elements = 3000  # row blocks of 128 and shorter last ones
  listed = convert.decode_programs(ckpt, ckpt.config(), convert._DTYPES[dtype], piece_elements)
  assert len(listed) == len(set(listed)) and any(p[0] != "transpose" for p in listed)
  assert len({p[1][0][0][0] for p in listed if p[0] == "transpose"}) >= 2  # partial blocks' programs too

  with monkeypatch.context() as m:
    m.setattr(convert, "Precompiler", _NoPrecompiler)  # the workers compile what they run
    convert.hf_to_orbax(hf, str(tmp_path / "workers"), dtype=dtype, piece_elements=piece_elements)
  assert sorted(p for p, _ in compiled) == sorted(listed)

  compiled.clear()
  monkeypatch.setattr(quant, "_PROGRAMS", {})
  convert.hf_to_orbax(hf, str(tmp_path / "ahead"), dtype=dtype, piece_elements=piece_elements)
  assert sorted(p for p, _ in compiled) == sorted(listed)
  assert "precompile" in {thread for _, thread in compiled}
  assert _arrays(tmp_path / "ahead") == _arrays(tmp_path / "workers")


def test_a_failed_compile_is_raised_and_retried(compiled, monkeypatch):
  """A program whose compile fails is not remembered: the next caller compiles it again (and meets the error)."""
  calls = []

  def failing(program):
    calls.append(program)
    raise RuntimeError("no compiler today")

  monkeypatch.setattr(quant, "_compile", failing)
  program = quant.fp8_programs(128, 256, (128, 128), transpose=False)[0]
  assert quant.precompile([]) == 0
  with pytest.raises(RuntimeError, match="no compiler"):
    quant.precompile([program])
  with pytest.raises(RuntimeError, match="no compiler"):
    quant._program(program)
  assert len(calls) == 2 and not quant._PROGRAMS


def test_cli_caches_the_decode_programs(tmp_path):
  """`--compilation_cache DIR` leaves the compiled decode programs in DIR (a rerun finds them there);
  `--compilation_cache=` leaves none; the checkpoints are the same either way."""
  hf = str(tmp_path / "hf")
  write_synthetic(hf, tiny(), "fp8", max_shard_bytes=1 << 20)
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["JAX_PLATFORMS"] = "cpu"
  cache = tmp_path / "cache"
  for out, flag in (("cached", f"--compilation_cache={cache}"), ("uncached", "--compilation_cache=")):
    cmd = [sys.executable, "-m", "kimi_jax.convert", "hf-to-orbax", "--hf_dir", hf, "--out_dir", str(tmp_path / out)]
    subprocess.run([*cmd, "--dtype", "bfloat16", "--noprogress", flag], check=True, env=env, capture_output=True)
  entries = os.listdir(cache)
  assert any(e.startswith("jit_fp8_decode") for e in entries) and any(e.startswith("jit_transpose") for e in entries)
  assert _arrays(tmp_path / "cached") == _arrays(tmp_path / "uncached")
