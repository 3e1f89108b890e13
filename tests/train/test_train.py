"""Training: loss falls, metrics and checkpoints are written, a rerun resumes exactly, mismatched configs fail."""

import json
import shutil
import subprocess
import sys

from helpers.paths import TINY_CONFIG
from helpers.train import read_metrics, small_config
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.train import train
from kimi_jax.training.state import ROUTER_BIAS_PATH, router_biases, with_router_biases
from kimi_jax.training.step import update_router_bias


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  train(small_config(12), str(workdir))
  return workdir


def test_loss_falls_and_metrics_are_written(uninterrupted):
  rows = read_metrics(uninterrupted)
  assert [r["step"] for r in rows] == list(range(1, 13))
  for key in ("loss", "tokens_per_sec", "learning_rate", "grad_norm", "max_logit", "expert_load_max_over_mean"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
  assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "4", "8"]
  events = list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().st_size > 0
  assert b"expert_load/moe_layer_0" in events[0].read_bytes()  # the per-layer load histogram


def test_resume_after_checkpoint_matches_uninterrupted(uninterrupted, tmp_path):
  """Simulate a preemption: keep only the step-8 checkpoint and the metrics up to 8, rerun the same command."""
  shutil.copytree(uninterrupted, tmp_path / "w")
  work = tmp_path / "w"
  shutil.rmtree(work / "checkpoints" / "12")
  rows = read_metrics(work)
  (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 8))
  train(small_config(12), str(work))
  resumed = read_metrics(work)
  assert [r["step"] for r in resumed] == list(range(1, 13))
  assert [r["loss"] for r in resumed] == [r["loss"] for r in read_metrics(uninterrupted)]


def test_workdir_of_another_config_is_refused(uninterrupted):
  c = small_config(12)
  c.model.hidden_size = 48
  with pytest.raises(ValueError, match=r"another model config \(hidden_size: 32 -> 48\)"):
    train(c, str(uninterrupted))


def test_router_bias_update_moves_toward_balance():
  bias = jnp.zeros((1, 4))
  load = jnp.array([[10, 0, 5, 5]])
  np.testing.assert_allclose(update_router_bias(bias, load, 0.1), [[-0.1, 0.1, 0.0, 0.0]])


def test_router_biases_are_found_and_replaced_by_name():
  """ROUTER_BIAS_PATH names the model's one RouterBias [L, E]; replacing it leaves the given dict as it was."""
  from flax import nnx
  import jax

  from kimi_jax.layers.moe import RouterBias
  from kimi_jax.model_stats import abstract_model
  from kimi_jax.train_config import model_config

  cfg = model_config(small_config(1))
  biases = nnx.state(abstract_model(cfg), RouterBias).to_pure_dict()
  [(path, leaf)] = jax.tree_util.tree_flatten_with_path(biases)[0]
  assert tuple(k.key for k in path) == ROUTER_BIAS_PATH
  assert leaf.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
  rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), biases)
  new = with_router_biases(rest, jnp.ones(leaf.shape))
  assert float(router_biases(new).sum()) == leaf.size and float(router_biases(rest).sum()) == 0


def test_unknown_config_field_is_an_error(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "kimi_jax.train",
      "--config",
      str(TINY_CONFIG),
      "--workdir",
      str(tmp_path),
      "--config.model.hiden_size=3",
    ],
    capture_output=True,
    text=True,
  )
  assert out.returncode != 0 and "hiden_size" in out.stderr


def test_muon_clip_training_logs_clipping(tmp_path):
  c = small_config(8)
  c.update(optimizer="muon_clip", qk_clip_tau=0.02, learning_rate=2e-2)  # max logits start ~0.04 at init
  train(c, str(tmp_path))
  rows = read_metrics(tmp_path)
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert all(len(r["max_logit_per_layer"]) == 2 for r in rows)
  assert sum(r["heads_clipped"] for r in rows) > 0
  assert all(r["heads_clipped"] <= 4 for r in rows)  # 2 layers x 2 heads


def test_init_from_a_model_checkpoint(uninterrupted, tmp_path):
  """A run started from a saved model begins at that model's loss, not at a random init's."""
  from flax import nnx

  from kimi_jax.checkpoint.model_io import load_any, save_model

  cfg, model = load_any(str(uninterrupted))
  save_model(str(tmp_path / "model"), cfg, nnx.state(model, nnx.Variable).to_pure_dict())
  c = small_config(1)
  c.init_from = str(tmp_path / "model")
  train(c, str(tmp_path / "run"))
  first = read_metrics(tmp_path / "run")[0]["loss"]
  full = read_metrics(uninterrupted)
  assert first < full[0]["loss"] - 0.5  # far below a fresh start: it begins from the trained weights
  with pytest.raises(ValueError, match="hidden_size"):
    c2 = small_config(1)
    c2.model.hidden_size = 48
    c2.init_from = str(tmp_path / "model")
    train(c2, str(tmp_path / "bad"))


def test_device_peak_flops_table():
  from kimi_jax.chips import device_peak_flops

  assert device_peak_flops("TPU v5p") == 459e12
  assert device_peak_flops("TPU v5 lite") == 197e12
  assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert device_peak_flops("cpu") is None  # no MFU is logged on CPU


def test_chunked_loss_equals_the_whole_logits_loss():
  """chunked_cross_entropy (logits made a piece at a time, recomputed in the backward pass) gives the loss and the
  gradients of the plain loss on the whole [B, S, V] logits; a chunk that does not divide S is refused."""
  import jax

  from kimi_jax.model import lm_logits
  from kimi_jax.training.step import chunked_cross_entropy, cross_entropy

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (2, 16)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 16)) > 0.3, jnp.float32)
  whole = lambda x, head: cross_entropy(lm_logits(x, head), targets, mask)[0]
  chunked = lambda x, head: chunked_cross_entropy(x, head, targets, mask, 4)[0]
  np.testing.assert_allclose(chunked(x, head), whole(x, head), rtol=1e-6)
  for got, want in zip(jax.grad(chunked, (0, 1))(x, head), jax.grad(whole, (0, 1))(x, head)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(chunked_cross_entropy(x, head, targets, mask, 4)[1]) == float(mask.sum())
  with pytest.raises(ValueError, match="loss_chunk=5 does not divide seq_len=16"):
    chunked_cross_entropy(x, head, targets, mask, 5)


def test_training_with_a_chunked_loss_logs_the_same_losses(uninterrupted, tmp_path):
  c = small_config(3)
  c.loss_chunk = 8
  train(c, str(tmp_path))
  chunked, whole = read_metrics(tmp_path), read_metrics(uninterrupted)[:3]
  np.testing.assert_allclose([r["loss"] for r in chunked], [r["loss"] for r in whole], rtol=1e-5)
