"""Training: the loop around the jit-compiled step, and its CLI.

    python -m kimi_jax.train --config configs/tiny.py --workdir runs/demo [--config.steps=100 ...]

Rerunning the same command resumes from the latest checkpoint in WORKDIR/checkpoints. Metrics go to
WORKDIR/metrics.jsonl, one JSON object per logged step, and to TensorBoard (WORKDIR/tensorboard). WORKDIR may be a
local path or a gs:// URL (kimi_jax/checkpoint/workdir.py lays it out on either).

A step of the loop: the data pipeline's next `Batch` (this process's rows) → a global array on the mesh → the train
step (kimi_jax/training/step.py) → new `TrainState`; every `eval_every` steps the held-out loss
(kimi_jax/training/evaluation.py); every `log_every` a metrics row with where the window's time went
(training/metrics.py); every `checkpoint_every` an asynchronous save of the state and the data iterator's position.
The guards (training/guards.py) watch for a non-finite step, SIGTERM and the steps to profile.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from absl import app, flags, logging
from flax import nnx
import jax
import ml_collections

from kimi_jax import cli_flags, sharding  # noqa: F401 (cli_flags: the shared --config)
from kimi_jax.checkpoint.workdir import Workdir
from kimi_jax.config import ModelConfig
from kimi_jax.model_stats import count_params, train_flops_per_step, train_flops_per_token
from kimi_jax.train_config import model_config
from kimi_jax.training import evaluation
from kimi_jax.training.guards import SKIPPED_STEPS_KEY, NonFiniteError, NonFiniteGuard, Preemption, Profiler
from kimi_jax.training.metrics import MetricsWriter, Progress, WindowClock
from kimi_jax.training.optimizer import build_optimizer, learning_rate_schedule
from kimi_jax.training.state import (
  abstract_train_state,
  init_train_state,
  model_shapes,
  param_shardings,
  restore_checkpoint,
  save_checkpoint,
)
from kimi_jax.training.step import make_train_step

# Flags (`python -m kimi_jax.train`); --config is shared (kimi_jax/cli_flags.py).
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics: a local path or gs://BUCKET/PATH.")


def train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train per `c` in `workdir` (resuming if it holds checkpoints). Returns the last logged metrics."""
  from kimi_jax.data.tokenizer import load_tokenizer

  cfg = model_config(c)
  if c.init_from is None:
    raise ValueError(
      "config.init_from is required by this config (it continues an earlier stage): pass "
      "--config.init_from=WORKDIR_OR_CHECKPOINT of the previous stage"
    )
  evaluation.check_eval_config(c)
  tokenizer = load_tokenizer(c.tokenizer)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(
      f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids"
    )
  wd = Workdir(workdir)
  wd.create()
  wd.check_architecture(cfg)
  if jax.process_index() == 0:
    wd.write_run_config(cfg, c.to_dict())

  mesh = sharding.make_mesh(c.mesh)
  sharding.check_batch(c.batch_size, mesh)
  if c.batch_size % (c.microbatches * jax.process_count()):
    raise ValueError(
      f"config.batch_size={c.batch_size} is not divisible by microbatches × processes "
      f"({c.microbatches} × {jax.process_count()})"
    )
  tx = build_optimizer(c, cfg, param_shardings(cfg, mesh) if mesh.size > 1 else None)
  abstract = abstract_train_state(model_shapes(cfg, mesh), tx, mesh)
  wd.check_free_space(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract)), "one checkpoint of the run")
  graphdef, state = init_train_state(c, cfg, tx, mesh)
  train_docs, eval_docs = evaluation.split_sources(c, tokenizer)
  data = evaluation.batch_stream(c, train_docs, tokenizer)
  evaluator = None
  if c.eval_every:
    evaluator = evaluation.Evaluator(c, graphdef, evaluation.eval_batches(c, eval_docs, tokenizer), mesh)
  ckpt = wd.checkpointer(keep=c.keep_checkpoints, keep_period=c.keep_period or None)
  start = ckpt.latest_step() or 0
  skipped = 0
  if start:
    state, data_state = restore_checkpoint(ckpt, start, state)
    skipped = data_state.pop(SKIPPED_STEPS_KEY, 0)
    data.set_state(data_state)
  if jax.process_index() == 0:
    _print_summary(cfg, c, workdir, start, mesh)

  step_fn = make_train_step(graphdef, tx, c, state.shardings())
  guard = NonFiniteGuard(c.on_nonfinite, state.params, skipped)
  debug_nan = c.debug_nan_step is not None and c.debug_nan_step >= 0
  to_global = functools.partial(jax.make_array_from_process_local_data, sharding.batch_sharding(mesh))
  schedule = learning_rate_schedule(c)
  tokens_per_step = c.batch_size * c.seq_len
  writer = MetricsWriter(wd, resume_step=start, flops_per_token=train_flops_per_token(cfg, c.seq_len))
  first, first_eval, last = None, None, {}
  progress = Progress(start, c.steps)
  clock, window_steps = WindowClock(), 0
  preempted_at = None

  def save(step: int) -> None:
    guard.check()  # raises ("stop") before a step past a non-finite one is saved; "skip" kept the state finite
    with clock.timing("checkpoint"):
      save_checkpoint(ckpt, step, state, {**data.get_state(), SKIPPED_STEPS_KEY: guard.skipped})
      writer.flush()  # on a bucket, the metrics up to a checkpoint are stored with it

  profiler = Profiler(c.profile_steps, wd)
  with Preemption() as preemption:
    try:
      for step in range(start + 1, c.steps + 1):
        with clock.timing("data"):
          batch = jax.tree.map(to_global, next(data))
        profiler.before(step)
        with sharding.use_mesh(mesh):
          state, metrics = step_fn(state, batch, step) if debug_nan else step_fn(state, batch)
        profiler.after(step, metrics)
        guard.add(step, metrics)
        window_steps += 1
        evaluating = evaluator is not None and (step % c.eval_every == 0 or step == c.steps)
        logged = evaluating or step % c.log_every == 0 or step in (1, c.steps)  # step 1: the starting loss
        saving = step % c.checkpoint_every == 0 or step == c.steps
        if logged:
          jax.block_until_ready(metrics)  # dispatch is async: time the finished steps, not their launch
          guard.check()  # before evaluating: a stopped run reports the step, not an eval of NaN weights
          eval_metrics = {}
          if evaluating:
            with clock.timing("eval"):
              eval_metrics = evaluator(state)
          wall, times = clock.read()
          last = writer.write(
            step,
            metrics,
            learning_rate=float(schedule(step - 1)),
            tokens_per_sec=window_steps * tokens_per_step / wall,
            skipped_steps=guard.skipped,
            **eval_metrics,
            **times,
          )
          progress.update(step, last)
          first = first or last
          first_eval = first_eval or (last if eval_metrics else None)
          window_steps = 0
        if saving:
          save(step)
        if step < c.steps and preemption.requested(at_sync_point=logged or saving):
          if not saving:
            save(step)
          preempted_at = step
          break
    except NonFiniteError:
      ckpt.wait()  # the checkpoints before the bad step are finite: let those in flight finish
      ckpt.close()
      writer.close()
      progress.close()
      raise
    finally:
      profiler.stop()  # a run that ends (or fails) inside the range still leaves its trace
    ckpt.wait()  # still under the SIGTERM handler: a notice now lets the last save finish
  ckpt.close()
  writer.close()
  progress.close()
  if preempted_at is not None:
    _report_preemption(preemption, preempted_at, c.preemption_grace_seconds)
    return last
  if first is not None and jax.process_index() == 0:
    line = f"loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})"
    if first_eval is not None:
      line += f"; eval loss {first_eval['eval_loss']:.3f} (step {first_eval['step']}) -> {last['eval_loss']:.3f}"
    print(line)
  if c.sample_tokens and jax.process_index() == 0:
    last["sample"] = _sample(c, graphdef, state, tokenizer)
    print(f"\nSample from the trained model:\n{last['sample']}\n")
  return last


def _report_preemption(preemption: Preemption, step: int, grace: float) -> None:
  took = time.monotonic() - preemption.requested_at if preemption.requested_at is not None else 0.0
  if took > grace:
    logging.warning("preemption: saving took %.1f s, over config.preemption_grace_seconds=%g", took, grace)
  if jax.process_index() == 0:
    print(
      f"preempted (SIGTERM): saved a checkpoint at step {step} {took:.1f} s after the signal; "
      "rerun the same command to resume",
      flush=True,
    )


def _sample(c: ml_collections.ConfigDict, graphdef, state, tokenizer) -> str:
  """config.sample_prompt continued by the trained model (config.sample_tokens tokens)."""
  from kimi_jax.generate import sample

  trained = nnx.merge(graphdef, nnx.State(jax.device_get(state.params)), nnx.State(jax.device_get(state.rest)))
  prompt = tokenizer.encode(c.sample_prompt, add_bos=True)
  new = sample(
    trained,
    prompt,
    max_new_tokens=c.sample_tokens,
    temperature=c.sample_temperature,
    seed=c.seed,
    stop_token=tokenizer.eos_id,
  )
  return c.sample_prompt + tokenizer.decode(new)


def _print_summary(cfg: ModelConfig, c: ml_collections.ConfigDict, workdir: str, start: int, mesh) -> None:
  counts = count_params(cfg)
  tokens = c.batch_size * c.seq_len
  print(
    f"kimi-jax train: {counts['total_params']:,} params ({counts['active_params']:,} active), "
    f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, "
    f"dtype {cfg.dtype}, moe_impl {cfg.moe_impl}"
  )
  print(
    f"  batch {c.batch_size}×{c.seq_len} = {tokens:,} tokens/step, "
    f"{train_flops_per_step(cfg, c.batch_size, c.seq_len):.3g} FLOPs/step, {c.optimizer} lr {c.learning_rate:g}"
  )
  if cfg.yarn_active:
    rope = f"YaRN factor {cfg.rope_factor:g} over {cfg.rope_original_max_position_embeddings}"
  elif cfg.rope_factor > 1:  # the weights carry YaRN fields this run leaves off: say so, it changes the numerics
    rope = (
      f"plain (the weights' YaRN factor {cfg.rope_factor:g} is off at seq_len {c.seq_len}; "
      "config.rope_scaling=yarn turns it on, as released models ran)"
    )
  else:
    rope = "plain"
  print(f"  rope {rope}, softmax scale {cfg.softmax_scale:.4g}")
  axes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
  print(f"  mesh {axes} over {jax.device_count()} {jax.default_backend()} device(s), {jax.process_count()} process(es)")
  fresh = f"starting from {c.init_from}" if c.init_from else "starting fresh"
  print(f"  workdir {workdir}: " + (f"resuming at step {start}" if start else fresh) + f", {c.steps} steps", flush=True)


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or workdir is None:
    raise app.UsageError("give --config (e.g. configs/tiny.py) and --workdir")
  from kimi_jax.distributed import initialize

  initialize()  # joins a multi-process job (TPU pod, SLURM, launch.local); no-op for one process
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  train(config, workdir)


if __name__ == "__main__":
  app.run(main)
