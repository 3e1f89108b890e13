"""Checkpoint conversion speed and memory on a synthetic K2-layout release, next to this machine's I/O floor.

    python benchmarks/convert.py [--gb 1] [--format fp8] [--workers 1,4] [--processes 1,2,4] [--dir /tmp] [--keep]
                                 [--floor fp8:bfloat16,...] [--repeats 3] [--reset auto]

Writes a synthetic release (tests/builders/synthetic.py: K2 shapes scaled down to hidden 2048 and 64
experts, random bytes in the release format) of about --gb GB, then times, each in a fresh process:
  floor rows    for each --floor conversion, --repeats rounds of: the I/O floor (every input byte read once with
                64 MiB O_DIRECT reads, as the converter reads; the output's byte count written once in 64 MiB
                writes of distinct 4 KiB blocks and fsynced), the conversion (`--workers 0`), the floor again.
                The ratio is the conversion's time over the mean of the two floors around it, so a disk whose
                speed drifts between steps (this project's VM's does, 2-4x within minutes) moves both; the
                table gives every round and the median. Round 1 compiles the decode programs (an empty
                compilation cache), later rounds find them cached.
  raw read      every shard file read once with large sequential reads (the disk/page-cache ceiling)
  hf-to-orbax   python -m kimi_jax.convert hf-to-orbax --dtype bfloat16 --workers N
  N processes   python -m launch.local --num_processes N -- -m kimi_jax.convert hf-to-orbax ... (each process
                converts its share of the pieces into the same checkpoint; --process_workers threads each)
  orbax-to-hf   python -m kimi_jax.convert orbax-to-hf (BF16, and --fp8)
Before every timed step the machine is put in the same state (--reset): `auto` syncs, drops the page cache
(/proc/sys/vm/drop_caches, where writable: root) and waits 3 s; without root, or with `files`, only the source
files' pages are dropped (posix_fadvise DONTNEED), so reads come from the disk either way, as with a real 1 TB
release that cannot stay cached. Dropping everything matters on VMs that hand freed memory back to the host
(Firecracker's free page reporting, as here): page-cache pages the host must fault in again cost 2-5x the
kernel time of recycled ones, and which kind a step gets otherwise depends on what ran before it.
GB/s is source bytes (what was read) per second; RSS is the converting process's peak resident set (the largest
one's, for several). The multi-process rows check that their checkpoint restores to the same arrays as the
first one's.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "tests"))  # the synthetic-release builder is test data
from builders.synthetic import FORMATS, k2_shaped, write_synthetic  # noqa: E402

_MEASURE = (
  "import resource, subprocess, sys, time; t = time.perf_counter(); "
  "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
  "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def drop_cache(directory: str) -> None:
  for path in glob.glob(os.path.join(directory, "**", "*"), recursive=True):
    if os.path.isfile(path):
      fd = os.open(path, os.O_RDONLY)
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      os.close(fd)


DROP_CACHES = "/proc/sys/vm/drop_caches"


def reset(mode: str, source: str) -> None:
  """Put the machine in the same state before a timed step (see the module docstring)."""
  drop_cache(source)
  if mode == "auto" and os.access(DROP_CACHES, os.W_OK):
    os.sync()
    with open(DROP_CACHES, "w") as f:
      f.write("3")
    time.sleep(3)  # the kernel reports freed memory to the host in the background (page_reporting: ~2 s)


def read_all(directory: str, direct: bool) -> tuple[float, int]:
  """(seconds, bytes) to read every safetensors file once in 64 MiB reads; with `direct`, O_DIRECT reads (plain
  ones where the file system refuses O_DIRECT), the converter's own way of reading."""
  raw = np.empty((64 << 20) + 4096, np.uint8)
  buf = memoryview(raw[-raw.ctypes.data % 4096 :][: 64 << 20])  # block-aligned, as O_DIRECT needs
  total, start = 0, time.perf_counter()
  for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    try:
      fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0))
    except OSError:
      fd = os.open(path, os.O_RDONLY)
    try:
      while n := os.readv(fd, [buf]):
        total += n
    finally:
      os.close(fd)
  return time.perf_counter() - start, total


def synced_write(directory: str, nbytes: int) -> float:
  """Seconds to write `nbytes` to a new file in `directory` in 64 MiB writes, fsync included (the write floor).

  Every 4 KiB block written is distinct (random bytes, its own counter in the first 8), as a conversion's output
  is: a storage layer that deduplicates or compresses repeated blocks would otherwise report a floor no real
  output can reach."""
  buf = bytearray(os.urandom(64 << 20))
  blocks = np.frombuffer(buf, dtype=np.uint64).reshape(-1, 512)  # [16384 blocks of 4 KiB, 512 words]
  path = os.path.join(directory, "write_speed.bin")
  start = time.perf_counter()
  with open(path, "wb", buffering=0) as f:
    for i in range(max(1, nbytes // len(buf))):
      blocks[:, 0] = np.arange(i * len(blocks), (i + 1) * len(blocks), dtype=np.uint64)
      f.write(buf)
    os.fsync(f.fileno())
  seconds = time.perf_counter() - start
  os.remove(path)
  return seconds * nbytes / (max(1, nbytes // len(buf)) * len(buf))


def floor(source: str, out_bytes: int, work: str, mode: str) -> tuple[float, int, float]:
  """(read seconds, bytes read, write seconds): the source read once and `out_bytes` written, each from a reset
  machine."""
  reset(mode, source)
  read_s, in_bytes = read_all(source, direct=True)
  reset(mode, source)
  return read_s, in_bytes, synced_write(work, out_bytes)


def output_bytes(hf_dir: str, dtype: str) -> int:
  """The array bytes converting `hf_dir` to `dtype` writes (the model's leaves; the router bias stays float32)."""
  import math

  from kimi_jax.checkpoint.hf import HFCheckpoint, abstract_state, flatten, leaf_dtype

  cfg = HFCheckpoint(hf_dir).config(param_dtype=dtype)
  want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  leaves = flatten(abstract_state(cfg))
  return sum(math.prod(leaf.shape) * leaf_dtype(path, want).itemsize for path, leaf in leaves.items())


_DECODE = """
import os, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
import ml_dtypes, numpy as np
from kimi_jax.checkpoint import quant
from kimi_jax.checkpoint.host_ops import transpose_cast
bf16 = np.dtype(ml_dtypes.bfloat16)
rng = np.random.default_rng(0)
wq = rng.integers(0, 126, (1024, 2048), dtype=np.uint8).view(quant.FP8_DTYPE)
scale = rng.random((8, 16), dtype=np.float32) * 1e-2
packed = rng.integers(-2**31, 2**31, (1024, 256), dtype=np.int64).astype(np.int32)
s4 = (rng.random((1024, 64)) * 1e-2).astype(bf16)
def fp8_before(dtype):  # today's path: table decode + transpose (host_ops), multiply, astype
  out = transpose_cast(wq, np.float32, True) * np.repeat(np.repeat(scale, 128, 0), 128, 1).T
  return out.astype(dtype)
def int4_before():
  q = quant.int4_unpack(packed, 2048, transpose=True).astype(np.float32)
  return (q.reshape(-1, 32, 1024) * s4.astype(np.float32).T[:, None, :]).reshape(q.shape).astype(bf16)
fp8 = lambda dtype: quant.fp8_dequantize(wq, scale, (128, 128), transpose=True, dtype=dtype)
int4 = lambda: quant.int4_dequantize(packed, s4, 2048, 32, transpose=True, dtype=bf16)
cases = {
  "FP8 -> bf16": (wq.nbytes, lambda: fp8_before(bf16), lambda: fp8(bf16)),
  "FP8 -> f32": (wq.nbytes, lambda: fp8_before(np.float32), lambda: fp8(np.float32)),
  "INT4 -> bf16": (packed.nbytes + s4.nbytes, int4_before, int4),
}
for name, (nbytes, before, after) in cases.items():
  assert before().tobytes() == after().tobytes(), name
  best = [1e9, 1e9]
  for _ in range(15):  # interleaved: the machine's load hits both alike
    for i, fn in enumerate((before, after)):
      t = time.perf_counter(); fn(); best[i] = min(best[i], time.perf_counter() - t)
  print(name, nbytes / best[0] / 1e9, nbytes / best[1] / 1e9)
"""


def decode_speed() -> list[tuple[str, float, float]]:
  """(conversion, GB/s of input before, after) of one K2-shaped expert piece decoded on one core, transposed."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
  out = subprocess.run(
    [sys.executable, "-c", _DECODE], capture_output=True, text=True, check=True, cwd=ROOT, env=env
  ).stdout
  return [(line.rsplit(" ", 2)[0], float(line.split()[-2]), float(line.split()[-1])) for line in out.splitlines()]


def measure(cmd: list[str]) -> tuple[float, float]:
  """(seconds, peak RSS GiB) of `cmd` run in a fresh process."""
  out = subprocess.run(
    [sys.executable, "-c", _MEASURE, *cmd],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  seconds, rss_kib = out.stdout.split()
  return float(seconds), int(rss_kib) / 2**20


def dir_bytes(directory: str) -> int:
  return sum(
    os.path.getsize(p) for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if os.path.isfile(p)
  )


def assert_same_arrays(a: str, b: str) -> None:
  """The model checkpoints `a` and `b` hold the same arrays, bit for bit (read slice by slice: bounded memory)."""
  from kimi_jax.checkpoint import orbax_arrays

  ctx = orbax_arrays.context(cache_bytes=0)
  sa, sb = os.path.join(a, "state"), os.path.join(b, "state")
  paths = orbax_arrays.read_tree_paths(sa)
  if sorted(paths) != sorted(orbax_arrays.read_tree_paths(sb)):
    raise AssertionError(f"{a} and {b} hold different leaves")
  for path in paths:
    x, y = orbax_arrays.open_array(sa, path, ctx), orbax_arrays.open_array(sb, path, ctx)
    if x.dtype != y.dtype or x.shape != y.shape:
      raise AssertionError(f"{'.'.join(path)}: {x.dtype}{x.shape} in {a}, {y.dtype}{y.shape} in {b}")
    for i in itertools.product(*(range(n) for n in x.shape[: max(x.ndim - 2, 0)])):  # one matrix at a time
      if x[i].read().result().tobytes() != y[i].read().result().tobytes():
        raise AssertionError(f"{'.'.join(path)}{list(i)} differs between {a} and {b}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gb", type=float, default=1.0, help="approximate size of the routed experts")
  parser.add_argument("--format", choices=FORMATS, default="fp8")
  parser.add_argument(
    "--floor",
    default="fp8:bfloat16,fp8:float32,int4:bfloat16",
    help="format:dtype conversions timed against the I/O floor ('' for none); each its own synthetic release",
  )
  parser.add_argument(
    "--workers", default="1,4", help="comma-separated worker counts for hf-to-orbax (0: the CLI's default; '' none)"
  )
  parser.add_argument(
    "--processes",
    default="1,2,4",
    help="comma-separated process counts for the multi-process hf-to-orbax rows ('' for none)",
  )
  parser.add_argument("--process_workers", type=int, default=1, help="--workers of each of those processes")
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (needs ~4x --gb of space)")
  parser.add_argument("--repeats", type=int, default=3, help="rounds of floor, conversion, floor per --floor row")
  parser.add_argument(
    "--reset", choices=("auto", "files"), default="auto", help="machine state before each timed step (see above)"
  )
  parser.add_argument("--keep", action="store_true", help="keep the files")
  args = parser.parse_args()

  work = tempfile.mkdtemp(prefix="kimi_convert_bench_", dir=args.dir)
  convert = [sys.executable, "-m", "kimi_jax.convert"]
  rows = []
  floor_rows = []
  try:
    for fmt_dtype in (f for f in args.floor.split(",") if f):
      fmt, dtype = fmt_dtype.split(":")
      hf = os.path.join(work, f"floor_{fmt}")
      if not os.path.exists(hf):
        write_synthetic(hf, k2_shaped(args.gb, fmt), fmt, max_shard_bytes=1 << 30)
      out = os.path.join(work, f"floor_{fmt}_{dtype}")
      cache = os.path.join(work, f"jax_cache_{fmt}_{dtype}")  # empty: round 1 compiles, later rounds look up
      out_bytes = output_bytes(hf, dtype)
      floor_after = floor(hf, out_bytes, work, args.reset)
      for round_ in range(1, args.repeats + 1):
        floor_before = floor_after  # the previous round's closing floor opens this one
        reset(args.reset, hf)
        load = os.getloadavg()[0]
        seconds, rss = measure(
          [*convert, "hf-to-orbax", "--hf_dir", hf, "--out_dir", out, "--dtype", dtype, "--workers", "0"]
          + ["--noprogress", f"--compilation_cache={cache}"]
        )
        written = dir_bytes(os.path.join(out, "state"))
        assert abs(written - out_bytes) < 0.01 * out_bytes, (written, out_bytes)  # (+ metadata and index)
        shutil.rmtree(out)
        floor_after = floor(hf, out_bytes, work, args.reset)
        read_s, in_bytes, write_s = (a + b for a, b in zip(floor_before, floor_after))
        read_s, in_bytes, write_s = read_s / 2, in_bytes // 2, write_s / 2
        what = f"{fmt} -> {dtype}, round {round_}{' (cold)' if round_ == 1 else ''}, load {load:.1f}"
        row = (what, in_bytes, out_bytes, read_s, write_s, seconds, seconds / (read_s + write_s), rss)
        floor_rows.append(row)
        print(row, f"floors {sum(floor_before[::2]):.1f} / {sum(floor_after[::2]):.1f} s", flush=True)
      ratio = statistics.median(r[6] for r in floor_rows[-args.repeats :])
      floor_rows.append((f"{fmt} -> {dtype}, median of {args.repeats}", *([None] * 5), ratio, None))
    decode = decode_speed()
    hf = os.path.join(work, "hf")
    cfg = k2_shaped(args.gb, args.format)
    start = time.perf_counter()
    size = write_synthetic(hf, cfg, args.format, max_shard_bytes=1 << 30)
    print(
      f"synthetic {args.format} release: {size / 1e9:.2f} GB, {cfg.num_hidden_layers} layers, "
      f"{cfg.n_routed_experts} experts, written in {time.perf_counter() - start:.1f} s",
      flush=True,
    )
    drop_cache(hf)
    seconds, nbytes = read_all(hf, direct=False)
    rows.append(("raw read (1 thread)", nbytes, seconds, None))
    ckpt = None
    for workers in (int(w) for w in args.workers.split(",") if w):
      ckpt = os.path.join(work, f"orbax_{workers}")
      drop_cache(hf)
      seconds, rss = measure(
        [
          *convert,
          "hf-to-orbax",
          "--hf_dir",
          hf,
          "--out_dir",
          ckpt,
          "--dtype",
          "bfloat16",
          "--workers",
          str(workers),
          "--noprogress",
        ]
      )
      rows.append((f"hf-to-orbax bf16, {workers} worker(s)", size, seconds, rss))
      print(rows[-1], flush=True)
    first = None
    for processes in (int(p) for p in args.processes.split(",") if p):
      out = os.path.join(work, f"orbax_{processes}p")
      drop_cache(hf)
      seconds, rss = measure(
        [
          sys.executable,
          "-m",
          "launch.local",
          "--num_processes",
          str(processes),
          "--",
          "-m",
          "kimi_jax.convert",
          "hf-to-orbax",
          "--hf_dir",
          hf,
          "--out_dir",
          out,
          "--dtype",
          "bfloat16",
          "--workers",
          str(args.process_workers),
          "--noprogress",
        ]
      )
      rows.append((f"hf-to-orbax bf16, {processes} proc x {args.process_workers} worker(s)", size, seconds, rss))
      print(rows[-1], flush=True)
      if first is None:
        first = out
      else:
        assert_same_arrays(first, out)
        shutil.rmtree(out)
    for fp8 in (False, True) if ckpt else ():
      out = os.path.join(work, f"hf_{fp8}")
      drop_cache(ckpt)
      seconds, rss = measure(
        [
          *convert,
          "orbax-to-hf",
          "--checkpoint",
          ckpt,
          "--out_dir",
          out,
          "--workers",
          "4",
          "--noprogress",
          *(["--fp8"] if fp8 else []),
        ]
      )
      rows.append(
        (f"orbax-to-hf {'fp8' if fp8 else 'bf16'}, 4 workers", dir_bytes(os.path.join(ckpt, "state")), seconds, rss)
      )
      shutil.rmtree(out)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  print(f"\n| {'what':42s} | {'GB read':>7s} | {'seconds':>7s} | {'GB/s':>5s} | {'peak RSS GiB':>12s} |")
  print(f"|{'-' * 44}|{'-' * 9}|{'-' * 9}|{'-' * 7}|{'-' * 14}|")
  for what, nbytes, seconds, rss in rows:
    rss = "-" if rss is None else f"{rss:.2f}"
    print(f"| {what:42s} | {nbytes / 1e9:7.2f} | {seconds:7.1f} | {nbytes / 1e9 / seconds:5.2f} | {rss:>12s} |")
  if floor_rows:
    print(
      f"\n| {'conversion (--workers 0: auto)':42s} | GB in | GB out | read s | write s | floor s | convert s | ratio |"
      " peak RSS GiB |"
    )
    print(f"|{'-' * 44}|-------|--------|--------|---------|---------|-----------|-------|--------------|")
    for what, nin, nout, rs, ws, sec, ratio, rss in floor_rows:
      if nin is None:
        print(f"| **{what}** | | | | | | | **{ratio:.2f}** | |")
        continue
      print(
        f"| {what:42s} | {nin / 1e9:5.2f} | {nout / 1e9:6.2f} | {rs:6.1f} | {ws:7.1f} | {rs + ws:7.1f} | {sec:9.1f} |"
        f" {ratio:5.2f} | {rss:12.2f} |"
      )
    print(
      "(floor: the mean of the floors measured just before and just after the conversion, each the input read at "
      "its direct-read speed + the output written at its synced-write speed; round 1: an empty compilation cache)"
    )
    dropped = args.reset == "auto" and os.access(DROP_CACHES, os.W_OK)
    print(
      "(before every timed step: "
      + ("sync, page cache dropped, 3 s)" if dropped else "only the source's pages dropped; the rest not reset)")
    )
    print(f"\n| {'decode on one core, [1024, 2048] expert, transposed':52s} | before GB/s | after GB/s | speed-up |")
    print(f"|{'-' * 54}|-------------|------------|----------|")
    for what, before, after in decode:
      print(f"| {what:52s} | {before:11.2f} | {after:10.2f} | {after / before:7.1f}x |")
    print("(GB/s of quantised input; before: numpy table decode + transpose, multiply, astype; after: quant.py)")
  print(f"\n{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
  main()
