"""Run settings for `kimi_jax.train` (ml_collections). Architecture numbers live in `config.model`, a copy of a
ModelConfig preset whose every field can be overridden: `--config.model.hidden_size=256`.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from kimi_jax.config import ModelConfig, preset

ROPE_SCALING_MODES = ("auto", "yarn", "none")


def base_config(model_preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  model = preset(model_preset).to_dict()
  del model["use_yarn"]  # a run setting: c.rope_scaling below
  c.model = model
  c.seed = 0
  c.tokenizer = "byte"  # or the path of a tiktoken.model file (Kimi K2's tokenizer)
  c.data = "corpus"  # "corpus", a `python -m kimi_jax.data.prepare` output dir, or .jsonl/.parquet/.array_record globs
  c.text_field = "text"  # JSON field / Parquet column of text files
  c.data_shards = 0  # independent data streams making up the batch; 0: one per process. Fix it (e.g. 8) to
  #                   get the same batches whatever the number of processes.
  c.steps = 1000
  c.batch_size = 8  # sequences per step, all processes together
  c.seq_len = 256
  c.rope_scaling = "auto"  # apply the weights' YaRN fields? "auto": only when seq_len exceeds
  #                          model.rope_original_max_position_embeddings (DeepSeek-V3's rule: K2 pretrained at 4K
  #                          with plain RoPE); "yarn" / "none" force it either way.
  c.mesh = ""  # e.g. "data=2,fsdp=4,expert=8,tensor=1" (kimi_jax/sharding.py); "": every device on fsdp
  c.microbatches = 1  # gradient accumulation: the batch is split into this many sequential pieces
  c.loss_chunk = 0  # positions per cross-entropy piece (must divide seq_len); 0: all at once. Bounds the float32
  #                  logits held at a time to [B, loss_chunk, V] (train.chunked_cross_entropy)
  c.optimizer = "adamw"  # or "muon_clip"
  c.learning_rate = 1e-3  # peak
  c.schedule = "cosine"  # warmup then cosine to the end; "wsd": warmup, constant, cosine over decay_steps;
  #                        "linear": warmup, then linear to the final rate at the last step
  c.warmup_steps = 100
  c.decay_steps = 0  # wsd only
  c.final_learning_rate_ratio = 0.1  # the schedule ends at peak × this
  c.qk_clip_tau = 100.0  # muon_clip only; <= 0 (or None) disables the clip
  c.muon_ns_dtype = "bfloat16"  # muon_clip: Newton–Schulz matmul dtype ("float32" for exact comparisons)
  c.muon_ns_impl = "auto"  # "xla" | "pallas" (all steps in VMEM, TPU; interpret mode on CPU) | "auto": pallas on TPU
  c.muon_ns_schedule = "quintic"  # muon_clip: "quintic" (K2's / Muon's (3.4445, -4.775, 2.0315) × 5) | "polar_express"
  c.muon_ns_gram = "auto"  # muon_clip: iterate rectangular matrices on their m×m Gram matrix (the same polynomial,
  #                         fewer FLOPs, restarted twice for bf16): "auto" where the Pallas kernel does not run | "on"
  #                         | "off"
  c.spread_newton_schulz = True  # muon_clip on a mesh: whole matrices per device (kimi_jax/optim/ns_sharding.py)
  c.weight_decay = 0.1
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.grad_clip_norm = 1.0
  c.router_bias_update_rate = 1e-3  # u in b += u · sign(mean_load − load_e)
  c.log_every = (
    10  # a row in metrics.jsonl: loss, grad norm, tokens/s, MFU, time_{data,step,checkpoint,eval}_s, goodput
  )
  c.eval_every = 0  # the held-out loss every this many steps and at the last (0: never); such steps are also logged
  c.eval_batches = 4  # batches of batch_size × seq_len per evaluation, the same ones every time
  c.eval_split = 0.0  # share of config.data's documents held out (every round(1/share)-th one); training never sees
  #                    them, whether or not it evaluates. 0: none
  c.eval_data = ""  # or a separate source to evaluate on, in any form config.data takes
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.keep_period = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
  c.on_nonfinite = "stop"  # a step whose loss or gradient norm is NaN/inf: "stop" raises NonFiniteError naming the
  #                         step and the first parameter with a non-finite gradient, before any checkpoint at or
  #                         after it; "skip" leaves params, optimizer state and router biases unchanged for that
  #                         step and counts it in the logged `skipped_steps`. Checked on the device each step, read
  #                         by the host only with the logged metrics and before a save.
  c.preemption_grace_seconds = 30.0  # on SIGTERM the run finishes its step, saves a checkpoint there, waits for it
  #                                    and exits 0; a warning says when that took longer than this (set it below
  #                                    the platform's notice: 30 s for GCE spot VMs, terminationGracePeriodSeconds)
  c.profile_steps = ""  # "START:END": a jax.profiler trace of steps START..END (inclusive) in WORKDIR/profile; "": none
  c.debug_nan_step = -1  # test/debug hook: make the loss (and so every gradient) NaN at this step; -1: off
  c.init_from = ""  # a model checkpoint (`kimi_jax.convert hf-to-orbax` output) or an earlier run's workdir to start
  #                   from; "": random init. Configs that continue a stage make it required (None).
  c.sample_tokens = 200  # tokens sampled from the trained model at the end (0: none)
  c.sample_prompt = "And God said, "
  c.sample_temperature = 0.7
  return c


def load_config_module(path: str):
  """A run configuration file as a module (for configs that build on another stage's file and constants)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_run_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a run configuration file such as configs/kimi_k2.py (what `--config` reads)."""
  return load_config_module(path).get_config()


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The run's ModelConfig: `c.model` plus `use_yarn` decided by `c.rope_scaling` for this run's seq_len."""
  model = c.model.to_dict()
  if "use_yarn" in model:
    raise ValueError("config.model.use_yarn is decided per run: set config.rope_scaling (auto | yarn | none)")
  if c.rope_scaling not in ROPE_SCALING_MODES:
    raise ValueError(f"config.rope_scaling {c.rope_scaling!r} not in {ROPE_SCALING_MODES}")
  if c.rope_scaling == "auto":
    use_yarn = c.seq_len > model["rope_original_max_position_embeddings"]
  else:
    use_yarn = c.rope_scaling == "yarn"
  return ModelConfig.from_dict({**model, "use_yarn": use_yarn})
