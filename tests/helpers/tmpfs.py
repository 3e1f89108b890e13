"""Small real file systems for the tests of full and read-only disks, without root or mocks: a child process in a
private user + mount namespace (`unshare -rm`) mounts a tmpfs of a given size (optionally read-only) on a directory;
the mount is seen by that process and its children only and disappears with them. Tests run as root too, where
chmod would not stop a write, so this is the way to get a real EROFS or ENOSPC.

`tmpfs_unavailable()` says why it cannot work here (no unshare, user namespaces disabled, as on some CI machines),
once per session; tests skip with that reason.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile

import pytest

# The script's prologue: mount the tmpfs on $MNT (exit 97 if that fails), then run the caller's script.
MOUNT = 'mount -t tmpfs -o "$TMPFS_OPTIONS" tmpfs "$MNT" || exit 97\n'
FILL = 'cat /dev/zero > "$MNT/fill" 2>/dev/null\n'  # until the tmpfs is full (cat fails with ENOSPC)


@functools.cache
def tmpfs_unavailable() -> str | None:
  """None when `unshare -rm` + a tmpfs mount works here; else why not (a skip reason)."""
  if shutil.which("unshare") is None:
    return "no `unshare` (util-linux) on PATH: cannot mount a private tmpfs"
  with tempfile.TemporaryDirectory() as d:
    try:
      p = subprocess.run(
        ["unshare", "-rm", "sh", "-c", MOUNT + 'touch "$MNT/probe"'],
        env={**os.environ, "MNT": d, "TMPFS_OPTIONS": "size=64k"},
        capture_output=True,
        text=True,
        timeout=30,
      )
    except (OSError, subprocess.TimeoutExpired) as e:
      return f"`unshare -rm` failed to run ({e})"
    if p.returncode != 0:
      why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
      return f"cannot mount a private tmpfs with `unshare -rm` (user namespaces disabled?): {why}"
  return None


def run_in_tmpfs(
  mount: os.PathLike,
  script: str,
  *args: str,
  size: str,
  read_only: bool = False,
  fill: bool = False,
  env: dict[str, str] | None = None,
  timeout: float = 600,
) -> subprocess.CompletedProcess:
  """Runs the sh `script` (its arguments `args` as "$@", the mount point as $MNT) in a private mount namespace in
  which `mount` (an existing directory) is a fresh tmpfs of `size` ("1m"), read-only or filled up first if asked.
  Skips the test when that cannot work here. Output is captured as text."""
  reason = tmpfs_unavailable()
  if reason:
    pytest.skip(reason)
  options = f"size={size}" + (",ro" if read_only else "")
  p = subprocess.run(
    ["unshare", "-rm", "sh", "-c", MOUNT + (FILL if fill else "") + script, "sh", *args],
    env={**(os.environ if env is None else env), "MNT": os.fspath(mount), "TMPFS_OPTIONS": options},
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert p.returncode != 97, f"mounting the tmpfs failed: {p.stderr[-2000:]}"
  return p
