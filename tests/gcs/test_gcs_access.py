"""Access errors against the local GCS server behind `AuthProxy` (tests/helpers/gcs_server.py), which answers as
GCS does (401 to a request without credentials, 403 to a write with a read-only token): every entry point that may
touch a bucket fails at start-up with one line naming the URL and the fix, and a read-only token still reads."""

import subprocess
import sys

from helpers.paths import REPO, TINY_CONFIG, TINY_HF
import pytest

BUCKET = "kimi-jax-access"


@pytest.fixture(scope="module")
def proxy(gcs):
  from helpers.gcs_server import AuthProxy

  gcs.create_bucket(BUCKET)
  p = AuthProxy(gcs.url, {"writer-token": "write", "reader-token": "read"})
  yield p
  p.stop()


def run(proxy, token, *args, cwd):
  # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: with a token, gcsfs would also ask GCS's gRPC control API for the
  # bucket layout, which an emulator does not serve (60 s timeouts each); this is gcsfs's own switch for that.
  env = {
    **proxy.env(token),
    "JAX_PLATFORMS": "cpu",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "PYTHONPATH": str(REPO),
  }
  return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def last_line(result) -> str:
  assert result.returncode != 0, result.stdout[-2000:]
  return result.stderr.strip().splitlines()[-1]


TRAIN = ["-m", "kimi_jax.train", "--config", str(TINY_CONFIG), "--config.steps=1"]


def test_no_credentials(proxy, tmp_path):
  for args, url in [
    (TRAIN + ["--workdir", f"gs://{BUCKET}/run"], f"gs://{BUCKET}/run"),
    (
      [
        "-m",
        "kimi_jax.convert",
        "hf-to-orbax",
        "--hf_dir",
        f"gs://{BUCKET}/release",
        "--out_dir",
        str(tmp_path / "out"),
      ],
      f"gs://{BUCKET}/release",
    ),
    (
      ["-m", "kimi_jax.forward", "--checkpoint", f"gs://{BUCKET}/ckpt", "--tokens", "x.npy", "--out", "y.npy"],
      f"gs://{BUCKET}/ckpt",
    ),
  ]:
    line = last_line(run(proxy, None, *args, cwd=tmp_path))
    assert line.startswith(f"PermissionError: {url}: no usable credentials for gs://{BUCKET}"), line
    assert "gcloud auth application-default login" in line and "Anonymous caller" in line, line
  assert not (tmp_path / "gs:").exists()


def test_read_only_token(proxy, tmp_path):
  for args, url in [
    (TRAIN + ["--workdir", f"gs://{BUCKET}/run"], f"gs://{BUCKET}/run"),
    (
      [
        "-m",
        "kimi_jax.convert",
        "hf-to-orbax",
        "--hf_dir",
        str(TINY_HF),
        "--out_dir",
        f"gs://{BUCKET}/converted",
      ],
      f"gs://{BUCKET}/converted",
    ),
  ]:
    line = last_line(run(proxy, "reader-token", *args, cwd=tmp_path))
    assert line.startswith(f"PermissionError: {url}: permission denied on gs://{BUCKET}"), line
    assert "roles/storage.objectAdmin" in line and "storage.objects.create" in line, line


def test_read_only_token_reads(proxy, gcs, tmp_path):
  """The proxy passes what the token may do: a release in the bucket converts to a local directory."""
  import fsspec

  fs = fsspec.filesystem("gs")  # this process talks to the server directly (the `gcs` fixture's variables)
  for f in sorted((TINY_HF).iterdir()):
    fs.put_file(str(f), f"{BUCKET}/release-ok/{f.name}")
  result = run(
    proxy,
    "reader-token",
    "-m",
    "kimi_jax.convert",
    "hf-to-orbax",
    "--hf_dir",
    f"gs://{BUCKET}/release-ok",
    "--out_dir",
    str(tmp_path / "out"),
    "--noprogress",
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "out" / "config.json").exists()
