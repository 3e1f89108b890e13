"""K2's recipe as run configs: plain RoPE at 4K, YaRN only for the long-context stage, the report's batch and
schedule in tokens (arXiv 2507.20534 §2.5), and `tools.plan --config` saying so."""

import json
import math
import subprocess
import sys

from helpers.train import SMALL_MODEL
import numpy as np
import pytest

from kimi_jax.config import tiny
from kimi_jax.layers.rope import rope_cos_sin, yarn_inv_freq
from kimi_jax.tools.plan import run_report
from kimi_jax.train import train
from kimi_jax.train_config import base_config, load_run_config, model_config

PLAIN_SCALE = 192**-0.5
K2_YARN_SCALE = 0.1308608  # transformers' DeepseekV3 `scaling` for K2 (tests/reference/README.md)
TOKENS_67M = 67_108_864


def report(name):
  return run_report(load_run_config(f"configs/{name}.py"))


def test_plan_cli_reports_plain_rope_for_k2_pretraining():
  out = subprocess.run(
    [sys.executable, "-m", "kimi_jax.tools.plan", "--config", "configs/kimi_k2.py", "--json"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  got = json.loads(out.strip().splitlines()[-1])
  assert got["rope_scaling"] is None
  assert got["softmax_scale"] == pytest.approx(PLAIN_SCALE, rel=1e-12)
  assert got["seq_len"] == 4096 and got["global_batch_tokens"] == TOKENS_67M


def test_k2_pretraining_schedule_is_the_reports():
  got = report("kimi_k2")
  assert got["total_tokens"] == pytest.approx(15.5e12, rel=1e-4)
  assert got["microbatches"] > 1 and 16384 % got["microbatches"] == 0
  (warm, stable, decay) = got["schedule"]
  assert warm["phase"] == "warmup" and warm["steps"] == [0, 500] and warm["learning_rate"] == pytest.approx([0.0, 2e-4])
  assert stable["tokens"][1] == pytest.approx(10e12, rel=1e-4)  # 2e-4 held for 10 T tokens
  assert stable["learning_rate"] == pytest.approx([2e-4, 2e-4])
  assert decay["phase"] == "cosine decay" and decay["tokens"][1] - decay["tokens"][0] == pytest.approx(5.5e12, 1e-4)
  assert decay["learning_rate"] == pytest.approx([2e-4, 2e-5], rel=1e-5)


def test_anneal_then_long_context_continue_one_decay_to_7e_6():
  anneal, long = report("kimi_k2_anneal"), report("kimi_k2_long")
  assert anneal["rope_scaling"] is None and anneal["softmax_scale"] == pytest.approx(PLAIN_SCALE)
  assert anneal["total_tokens"] == pytest.approx(400e9, abs=TOKENS_67M)
  assert long["total_tokens"] == pytest.approx(60e9, abs=TOKENS_67M)
  assert anneal["global_batch_tokens"] == long["global_batch_tokens"] == TOKENS_67M
  (a,), (b,) = anneal["schedule"], long["schedule"]
  assert a["learning_rate"][0] == pytest.approx(2e-5) and b["learning_rate"][1] == pytest.approx(7e-6, rel=1e-5)
  assert a["learning_rate"][1] == pytest.approx(b["learning_rate"][0], rel=1e-6)  # one line across both stages


def test_long_context_stage_applies_yarn():
  got = report("kimi_k2_long")
  assert got["seq_len"] == 32768
  assert got["rope_scaling"] == {
    "type": "yarn",
    "factor": 32.0,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
  }
  assert got["softmax_scale"] == pytest.approx(K2_YARN_SCALE, rel=1e-6)


def test_stages_after_the_first_require_init_from(tmp_path):
  c = load_run_config("configs/kimi_k2_anneal.py")
  with pytest.raises(ValueError, match="config.init_from is required"):
    train(c, str(tmp_path))


@pytest.mark.parametrize(
  "mode, seq_len, expected",
  [("auto", 256, False), ("auto", 4096, False), ("auto", 4097, True), ("yarn", 256, True), ("none", 32768, False)],
)
def test_rope_scaling_follows_the_run(mode, seq_len, expected):
  c = base_config("tiny")  # original_max_position_embeddings 4096, YaRN factor 32 in the weights' config
  c.update(rope_scaling=mode, seq_len=seq_len)
  cfg = model_config(c)
  assert cfg.use_yarn is expected and cfg.rope_factor == 32.0  # the weights' fields stay as released
  assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5 * (1.3465736**2 if expected else 1.0))


def test_rope_scaling_errors_name_the_field():
  c = base_config("tiny")
  c.rope_scaling = "on"
  with pytest.raises(ValueError, match="config.rope_scaling 'on'"):
    model_config(c)
  c = base_config("tiny")
  c.model.use_yarn = True
  with pytest.raises(ValueError, match="config.rope_scaling"):
    model_config(c)


def test_plain_rope_frequencies_without_yarn():
  cfg = tiny(use_yarn=False)
  d = cfg.qk_rope_head_dim
  plain = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
  np.testing.assert_allclose(yarn_inv_freq(cfg), plain, rtol=1e-6)
  yarn = yarn_inv_freq(tiny())
  assert np.any(yarn < 0.9 * plain)  # the released config's YaRN does divide some frequencies
  cos, _ = rope_cos_sin(np.arange(8)[None], cfg)
  np.testing.assert_allclose(np.asarray(cos[0, 3]), np.cos(3 * plain), rtol=1e-5)


def test_training_records_and_reloads_the_runs_rope(tmp_path):
  """A 4K-or-shorter run trains with plain RoPE; its workdir says so, and forward/generate read it back."""
  from kimi_jax.checkpoint.model_io import load_any

  c = base_config("tiny")
  c.model.update(**SMALL_MODEL)
  c.update(steps=1, batch_size=2, seq_len=16, log_every=1, checkpoint_every=1, sample_tokens=0)
  train(c, str(tmp_path))
  saved = json.loads((tmp_path / "run_config.json").read_text())
  assert saved["model"]["use_yarn"] is False and saved["model"]["rope_factor"] == 32.0
  cfg, _ = load_any(str(tmp_path))
  assert cfg.use_yarn is False and math.isclose(cfg.softmax_scale, cfg.qk_head_dim**-0.5)
