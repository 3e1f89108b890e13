"""Held-out evaluation: held-out documents never reach training, the eval loss is the model's mean NLL on fixed
batches (checked against full logits from the saved model), it falls, and a resumed run logs the same numbers."""

import json
import shutil

from flax import nnx
from helpers.train import read_metrics, small_config
import jax
import numpy as np
import pytest

from kimi_jax import sharding
from kimi_jax.checkpoint.model_io import load_any
from kimi_jax.data.sources import HeldOut
from kimi_jax.data.tokenizer import load_tokenizer
from kimi_jax.train import train
from kimi_jax.training import evaluation
from kimi_jax.training.state import TrainState

STEPS = 12


def eval_config():
  c = small_config(STEPS)
  c.update(eval_every=4, eval_split=0.1, eval_batches=2, log_every=3)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval")
  train(eval_config(), str(workdir))
  return workdir


@pytest.mark.parametrize("count", [1, 9, 10, 11, 1189])
@pytest.mark.parametrize("period", [2, 3, 10])
def test_held_out_documents_are_every_nth_and_never_trained_on(count, period):
  docs = [np.array([i], np.int32) for i in range(count)]
  held = [int(d[0]) for d in HeldOut(docs, period=period, held_out=True)]
  kept = [int(d[0]) for d in HeldOut(docs, period=period, held_out=False)]
  assert held == [i for i in range(count) if i % period == period - 1]
  assert kept == [i for i in range(count) if i % period != period - 1]
  with pytest.raises(IndexError):
    HeldOut(docs, period=period, held_out=False)[len(kept)]


def test_eval_rows_are_logged_and_the_eval_loss_falls(run):
  rows = read_metrics(run)
  assert [r["step"] for r in rows] == [1, 3, 4, 6, 8, 9, 12]  # log_every=3, eval_every=4, first and last
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [4, 8, 12]
  assert all(r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"])) for r in evals)
  assert len({r["eval_tokens"] for r in evals}) == 1  # the same batches every time
  assert evals[0]["eval_tokens"] > 0.9 * 2 * 4 * 32  # eval_batches × batch_size × seq_len, little padding
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  events = next((run / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
  assert b"eval_loss" in events and b"goodput" in events


def test_eval_loss_is_the_saved_models_mean_nll_on_the_held_out_batches(run):
  """Recomputed outside the eval step: full [B, S, V] logits of the step-12 checkpoint, log-softmax in float64."""
  c = eval_config()
  _, model = load_any(str(run))
  tokenizer = load_tokenizer(c.tokenizer)
  _, held_out = evaluation.split_sources(c, tokenizer)
  batches = evaluation.eval_batches(c, held_out, tokenizer)
  nll, count = 0.0, 0.0
  for b in batches:
    logits, _ = model(b.inputs, positions=b.positions, segment_ids=b.segment_ids)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    picked = np.take_along_axis(np.asarray(logp), b.targets[..., None], axis=-1)[..., 0]
    nll -= float(np.sum(picked * b.loss_mask))
    count += float(np.sum(b.loss_mask))
  last = [r for r in read_metrics(run) if "eval_loss" in r][-1]
  assert last["eval_tokens"] == count
  assert last["eval_loss"] == pytest.approx(nll / count, rel=1e-5)


def test_resumed_run_logs_the_same_eval_numbers(run, tmp_path, capsys):
  """Keep only the step-8 checkpoint and the rows up to 8, rerun: every row after it, eval included, is the same."""
  work = tmp_path / "w"
  shutil.copytree(run, work)
  shutil.rmtree(work / "checkpoints" / "12")
  (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(run) if r["step"] <= 8))
  train(eval_config(), str(work))
  keys = ("step", "loss", "eval_loss", "eval_perplexity", "eval_tokens")
  pick = lambda rows: [{k: r.get(k) for k in keys} for r in rows]
  assert pick(read_metrics(work)) == pick(read_metrics(run))
  last = read_metrics(run)[-1]  # this run's first evaluation is its last, step 12
  assert f"; eval loss {last['eval_loss']:.3f} (step 12) -> {last['eval_loss']:.3f}" in capsys.readouterr().out


def test_each_window_says_where_its_time_went(run):
  rows = read_metrics(run)
  parts = ("time_data_s", "time_step_s", "time_checkpoint_s", "time_eval_s")
  for r in rows:
    assert all(r[p] >= 0 for p in parts) and 0 < r["goodput"] <= 1
    assert r["goodput"] == pytest.approx(r["time_step_s"] / sum(r[p] for p in parts), rel=1e-6)
  by_step = {r["step"]: r for r in rows}
  assert by_step[6]["time_checkpoint_s"] > 0  # the window after the step-4 save holds it
  assert all(by_step[s]["time_eval_s"] > 0 for s in (4, 8, 12)) and by_step[6]["time_eval_s"] == 0


def test_the_evaluator_compiles_its_step_once(run):
  c = eval_config()
  tokenizer = load_tokenizer(c.tokenizer)
  _, model = load_any(str(run))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = TrainState(params.to_pure_dict(), rest.to_pure_dict(), None)
  batches = evaluation.eval_batches(c, evaluation.split_sources(c, tokenizer)[1], tokenizer)
  evaluator = evaluation.Evaluator(c, graphdef, batches, sharding.make_mesh(""))
  first, second = evaluator(state), evaluator(state)
  assert first == second
  assert evaluator.step._cache_size() == 1
  last = [r for r in read_metrics(run) if "eval_loss" in r][-1]
  assert first["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(eval_every=5), r"eval_every=5 needs documents to evaluate on: set config.eval_split"),
    (dict(eval_split=0.1, eval_data="corpus"), r"eval_split .* or config.eval_data, not both"),
    (dict(eval_split=0.7), r"eval_split is the share of documents held out, in \[0, 0.5\]; got 0.7"),
    (dict(eval_every=2, eval_batches=0), r"eval_batches >= 1"),
  ],
)
def test_contradictory_eval_settings_are_named(overrides, message, tmp_path):
  c = small_config(2)
  c.update(**overrides)
  with pytest.raises(ValueError, match=message):
    train(c, str(tmp_path))
