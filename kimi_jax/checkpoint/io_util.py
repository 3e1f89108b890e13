"""Small I/O helpers shared by the converters: a bounded thread pool and atomic JSON writes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
import concurrent.futures
import json
import os
from typing import Any


def run_bounded(fn: Callable[[Any], None], items: Iterable[Any], workers: int) -> None:
  """fn over items on `workers` threads, at most 2 × workers submitted at once (bounding the memory that queued
  work holds); the first error is raised after running calls finish, and queued ones are dropped."""
  workers = max(1, workers)
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  try:
    pending: set[concurrent.futures.Future] = set()
    for item in items:
      pending.add(pool.submit(fn, item))
      if len(pending) >= 2 * workers:
        finished, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in finished:
          f.result()
    for f in concurrent.futures.as_completed(pending):
      f.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def write_json(path: str, obj: Any) -> None:
  """Write JSON to `path` through a temporary file and a rename, so readers never see half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def progress_bar(enabled: bool, total: float, initial: float, desc: str):
  """A tqdm bar counting bytes (shows GB and GB/s); a no-op when not enabled."""
  from tqdm import tqdm

  return tqdm(
    total=int(total),
    initial=int(initial),
    unit="B",
    unit_scale=True,
    unit_divisor=1000,
    desc=desc,
    disable=not enabled,
    dynamic_ncols=True,
    smoothing=0.1,
  )
