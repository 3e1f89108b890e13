"""The README's Cloud TPU walkthrough ("Buckets, end to end"), command for command, against the local GCS server:
a release in a bucket converted into the bucket, text in the bucket tokenised into shards in the bucket, a run
in the bucket started from the converted model, stopped and resumed, its metrics read, and text generated from
it. A tiny random FP8 release (K2's format, the tiny config's shape, 256 byte ranks as its tiktoken.model) stands in
for Kimi-K2-Base, and configs/tiny.py for configs/kimi_k2_anneal.py."""

import base64
import gzip
import json
import os
import re
import subprocess
import sys

from helpers.paths import REPO
import pytest

BUCKET = "kimi-jax-walkthrough"
B = f"gs://{BUCKET}"
RELEASE = f"{B}/releases/Kimi-K2-Tiny"
TOKENIZER = f"{RELEASE}/tiktoken.model"


@pytest.fixture(scope="module")
def bucket(gcs, tmp_path_factory):
  """`gcloud storage buckets create`, then `gcloud storage cp -r` of the release and the text."""
  from builders.synthetic import write_synthetic
  import fsspec

  from kimi_jax.config import tiny
  from kimi_jax.data.sources import load_corpus

  gcs.create_bucket(BUCKET)
  local = tmp_path_factory.mktemp("release")
  write_synthetic(str(local), tiny(), "fp8")
  (local / "tiktoken.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
  text = tmp_path_factory.mktemp("text") / "part-000.jsonl.gz"
  with gzip.open(text, "wt") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for t in load_corpus()[:200])
  fs = fsspec.filesystem("gs")
  for p in sorted(local.iterdir()):
    fs.put_file(str(p), f"{RELEASE}/{p.name}")
  fs.put_file(str(text), f"{B}/text/{text.name}")
  return BUCKET


def sh(*args, cwd):
  """One walkthrough line, as a new process (the emulator variables come from the `gcs` fixture)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  return result.stdout


def test_the_walkthrough(bucket, gcs, tmp_path):
  cwd = REPO  # run from the repository root, as the README says
  sh(
    "-m",
    "kimi_jax.convert",
    "hf-to-orbax",
    "--hf_dir",
    RELEASE,
    "--out_dir",
    f"{B}/checkpoints/k2-tiny",
    "--dtype",
    "bfloat16",
    "--noprogress",
    cwd=cwd,
  )
  assert json.loads(gcs.read_object(BUCKET, "checkpoints/k2-tiny/conversion.json"))["complete"]

  out = sh(
    "-m",
    "kimi_jax.data.prepare",
    "--input",
    f"{B}/text/*.jsonl.gz",
    "--tokenizer",
    TOKENIZER,
    "--output",
    f"{B}/data/prepared",
    cwd=cwd,
  )
  assert "200 documents" in out

  train = [
    "-m",
    "kimi_jax.train",
    "--config",
    "configs/tiny.py",
    "--workdir",
    f"{B}/runs/anneal",
    f"--config.init_from={B}/checkpoints/k2-tiny",
    f"--config.data={B}/data/prepared",
    f"--config.tokenizer={TOKENIZER}",
    "--config.checkpoint_every=4",
    "--config.log_every=1",
    "--config.sample_tokens=0",
  ]
  out = sh(*train, "--config.steps=8", cwd=cwd)
  assert f"starting from {B}/checkpoints/k2-tiny" in out
  out = sh(*train, "--config.steps=12", cwd=cwd)  # the same command (longer): resumes from the bucket
  assert "resuming at step 8" in out

  rows = [json.loads(r) for r in gcs.read_object(BUCKET, "runs/anneal/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 13))
  # Started from the release's weights: its random FP8 model is no better than uniform over 512 ids (~6.2 nats).
  assert 5.5 < rows[0]["loss"] < 8 and rows[-1]["loss"] < rows[0]["loss"]

  print([round(r["loss"], 3) for r in rows])
  out = sh(
    "-m",
    "kimi_jax.generate",
    "--checkpoint",
    f"{B}/runs/anneal",
    "--tokenizer",
    TOKENIZER,
    "--prompt",
    "And God said, ",
    "--max_new_tokens",
    "16",
    cwd=cwd,
  )
  assert out.startswith("And God said, ") and re.search(r"decode: \d+ steps", out)
  assert not (REPO / "gs:").exists() and not (tmp_path / "gs:").exists()
