"""Multi-process hf-to-orbax: N processes convert disjoint shares into one checkpoint that restores to the same
arrays, bit for bit, as a one-process conversion; interrupted multi-process conversions resume, with any count.

Most tests run the processes one after another in this process (each share is independent; process 0 runs last
and finds the others' done markers), which exercises the same files and databases as concurrent processes; one
test runs two real concurrent processes through `python -m launch.local`."""

import itertools
import json
import os
import subprocess
import sys

from helpers.paths import REPO, TINY_FP8, TINY_HF, TINY_INT4, TINY_K25
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kimi_jax.checkpoint import convert, orbax_arrays
from kimi_jax.checkpoint.hf import HFCheckpoint, flatten

FIXTURES = {p.name: str(p) for p in (TINY_HF, TINY_FP8, TINY_INT4, TINY_K25)}  # by directory name: tiny_hf, ...
PIECE = 512  # elements: splits the fixtures' larger tensors into row blocks, so shares cut through tensors


def _restore(out):
  """{path: array} of the converted checkpoint, restored by Orbax itself."""
  return flatten(ocp.StandardCheckpointer().restore(os.path.join(out, "state")))


def _assert_same_checkpoint(a, b):
  """Same arrays bit for bit (dtype, shape, bytes) and the same config.json / hf_wrapper.json."""
  ra, rb = _restore(a), _restore(b)
  assert ra.keys() == rb.keys()
  for path in ra:
    a_, b_ = np.asarray(ra[path]), np.asarray(rb[path])
    assert a_.dtype == b_.dtype and a_.shape == b_.shape and a_.tobytes() == b_.tobytes(), ".".join(path)
  for name in ("config.json", "hf_wrapper.json"):
    assert os.path.isfile(os.path.join(a, name)) == os.path.isfile(os.path.join(b, name)), name
    if os.path.isfile(os.path.join(a, name)):
      with open(os.path.join(a, name)) as fa, open(os.path.join(b, name)) as fb:
        assert json.load(fa) == json.load(fb), name


def _chunk_keys(*directories):
  ctx = orbax_arrays.context()
  return {k for d in directories for k in orbax_arrays.list_keys(d, ctx) if not k.endswith("/.zarray")}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """One-process conversions, made once per fixture and dtype."""
  made = {}

  def get(name, dtype="float32", piece_elements=PIECE):
    key = (name, dtype, piece_elements)
    if key not in made:
      made[key] = str(tmp_path_factory.mktemp(f"single_{name}_{dtype}") / "ckpt")
      convert.hf_to_orbax(FIXTURES[name], made[key], dtype=dtype, piece_elements=piece_elements)
    return made[key]

  return get


def test_share_cuts_contiguous_balanced_runs():
  sizes = [5, 1, 1, 1, 8, 2, 2, 4]  # total 24
  shares = [convert.share(sizes, i, 3) for i in range(3)]
  assert [s.start for s in shares] == [0, 4, 5] and shares[-1].stop == len(sizes)
  assert all(a.stop == b.start for a, b in itertools.pairwise(shares))  # disjoint and covering, in order
  assert convert.share(sizes, 0, 1) == slice(0, len(sizes))
  assert [convert.share([3], i, 4) for i in range(4)] == [slice(0, 1)] + [slice(1, 1)] * 3  # more processes
  big = [1000] * 97
  assert max(len(range(*convert.share(big, i, 8).indices(97))) for i in range(8)) <= 13


@pytest.mark.parametrize("name,dtype", [("tiny_fp8", "bfloat16"), ("tiny_int4", "float32"), ("tiny_k25", "float32")])
def test_two_processes_equal_one_process(tmp_path, single, name, dtype):
  out = str(tmp_path / "ckpt")
  stats = [
    convert.hf_to_orbax(
      FIXTURES[name], out, dtype=dtype, piece_elements=PIECE, process_index=i, process_count=2, wait_timeout=0
    )
    for i in (1, 0)
  ]
  assert all(s.bytes_read > 0 for s in stats)
  _assert_same_checkpoint(out, single(name, dtype))
  # Each process wrote its own share into its own database: disjoint, together everything the root references.
  state = os.path.join(out, "state")
  shares = [_chunk_keys(*orbax_arrays.process_dirs(state, i)) for i in range(2)]
  assert shares[0] and shares[1] and not shares[0] & shares[1]
  assert shares[0] | shares[1] == _chunk_keys(state) == _chunk_keys(os.path.join(single(name, dtype), "state"))
  assert sorted(os.listdir(out)) == sorted(os.listdir(single(name, dtype)))  # no logs or markers left behind
  with open(os.path.join(out, convert.STATUS_FILE)) as f:
    assert json.load(f)["complete"]


def _log(out, process_index):
  with open(os.path.join(out, f"conversion.{process_index}.log")) as f:
    return set(f.read().splitlines())


class Killed(Exception):
  pass


@pytest.fixture
def crash_reads(monkeypatch):
  """reads: the tensors read; set crash["at"] = k to raise Killed on the k-th read (0: never)."""
  reads, crash, original = [], {"at": 0}, HFCheckpoint.read

  def read(self, name, rows=None, **kwargs):
    reads.append(name)
    if len(reads) == crash["at"]:
      raise Killed()
    return original(self, name, rows, **kwargs)

  monkeypatch.setattr(HFCheckpoint, "read", read)
  return reads, crash


def test_killed_process_resumes(tmp_path, single, crash_reads):
  """Process 1 dies after 5 pieces; process 0 finishes its share and waits; process 1's rerun converts only what
  it had not logged, and process 0's rerun then finishes the checkpoint without converting anything."""
  reads, crash = crash_reads
  fixture, out = FIXTURES["tiny_hf"], str(tmp_path / "ckpt")
  run = lambda i, **kw: convert.hf_to_orbax(
    fixture, out, piece_elements=PIECE, process_index=i, process_count=2, workers=1, **kw
  )
  crash["at"] = 6
  with pytest.raises(Killed):
    run(1)
  assert len(_log(out, 1)) == 5
  crash["at"], reads[:] = 0, []
  with pytest.raises(TimeoutError, match=r"processes \[1\] of 2 .*--process_index"):
    run(0, wait_timeout=0.2)
  share0 = len(reads)
  assert not os.path.exists(os.path.join(out, "config.json"))  # nothing declares the checkpoint complete yet
  logs = [_log(out, i) for i in range(2)]
  assert len(logs[0]) == share0 and not logs[0] & logs[1]  # the shares are disjoint

  reads[:] = []
  run(1)
  assert len(convert._logged(out)) == share0 + 5 + len(reads)  # every piece converted exactly once
  reads[:] = []
  run(0, wait_timeout=0)
  assert not reads
  assert not [n for n in os.listdir(out) if n.endswith((".log", ".done"))]
  _assert_same_checkpoint(out, single("tiny_hf"))


def test_resume_with_another_process_count(tmp_path, single, crash_reads):
  """A 2-process run whose process 1 died is finished by one process: only the missing pieces are converted and
  the per-process database already written is merged in."""
  reads, crash = crash_reads
  fixture, out = FIXTURES["tiny_fp8"], str(tmp_path / "ckpt")
  crash["at"] = 4
  with pytest.raises(Killed):
    convert.hf_to_orbax(fixture, out, piece_elements=PIECE, process_index=1, process_count=2, workers=1)
  crash["at"], reads[:] = 0, []
  convert.hf_to_orbax(fixture, out, piece_elements=PIECE)
  resumed = len(reads)
  reads[:] = []
  convert.hf_to_orbax(fixture, str(tmp_path / "fresh"), piece_elements=PIECE)
  assert resumed == len(reads) - 3
  _assert_same_checkpoint(out, single("tiny_fp8"))


def test_launch_local_two_concurrent_processes(tmp_path, single):
  """The CLI under `python -m launch.local --num_processes 2`: two real processes, the index and count read
  from the launcher's environment."""
  out = str(tmp_path / "ckpt")
  env = {k: v for k, v in os.environ.items() if not k.startswith("KIMI_")}
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes",
      "2",
      "--",
      "-m",
      "kimi_jax.convert",
      "hf-to-orbax",
      "--hf_dir",
      FIXTURES["tiny_int4"],
      "--out_dir",
      out,
      "--noprogress",
      "--workers",
      "2",
    ],
    check=False,
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "[1] hf-to-orbax: process 1 of 2 converted its share" in result.stdout
  assert "[0] hf-to-orbax: process 0 of 2 finished the checkpoint" in result.stdout
  _assert_same_checkpoint(out, single("tiny_int4", piece_elements=convert.PIECE_ELEMENTS))
  shares = [_chunk_keys(*orbax_arrays.process_dirs(os.path.join(out, "state"), i)) for i in range(2)]
  assert shares[0] and shares[1] and not shares[0] & shares[1]


_SIGKILLED_WORKER = """
import os, signal, sys
from kimi_jax.checkpoint import convert
from kimi_jax.checkpoint.hf import HFCheckpoint
original, reads = HFCheckpoint.read, []
def read(self, name, rows=None, **kwargs):
  reads.append(name)
  if len(reads) == 8:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a host that dies
  return original(self, name, rows, **kwargs)
HFCheckpoint.read = read
convert.hf_to_orbax(sys.argv[1], sys.argv[2], piece_elements=int(sys.argv[3]), workers=2, process_index=1,
                    process_count=2)
"""


def test_sigkilled_process_resumes(tmp_path, single):
  """Process 1 SIGKILLed mid-share (two workers, one of them mid-write); the reruns finish the same checkpoint."""
  out = str(tmp_path / "ckpt")
  result = subprocess.run(
    [sys.executable, "-c", _SIGKILLED_WORKER, FIXTURES["tiny_fp8"], out, str(PIECE)],
    check=False,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == -9, result.stderr
  assert 0 < len(_log(out, 1)) < 8
  for i in (1, 0):
    convert.hf_to_orbax(
      FIXTURES["tiny_fp8"], out, piece_elements=PIECE, process_index=i, process_count=2, wait_timeout=0
    )
  _assert_same_checkpoint(out, single("tiny_fp8"))
