"""Run settings for `kimi_jax.train` (ml_collections). Architecture numbers live in `config.model`, a copy of a
ModelConfig preset whose every field can be overridden: `--config.model.hidden_size=256`.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from kimi_jax.config import ModelConfig, preset


def base_config(model_preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = preset(model_preset).to_dict()
  c.seed = 0
  c.tokenizer = "byte"  # or the path of a tiktoken.model file (Kimi K2's tokenizer)
  c.data = "corpus"  # "corpus", a `python -m kimi_jax.data.prepare` output dir, or .jsonl/.parquet/.array_record globs
  c.text_field = "text"  # JSON field / Parquet column of text files
  c.data_shards = 0  # independent data streams making up the batch; 0: one per process. Fix it (e.g. 8) to
  #                   get the same batches whatever the number of processes.
  c.steps = 1000
  c.batch_size = 8  # sequences per step, all processes together
  c.seq_len = 256
  c.mesh = ""  # e.g. "data=2,fsdp=4,expert=8,tensor=1" (kimi_jax/sharding.py); "": every device on fsdp
  c.microbatches = 1  # gradient accumulation: the batch is split into this many sequential pieces
  c.optimizer = "adamw"  # or "muon_clip"
  c.learning_rate = 1e-3  # peak
  c.schedule = "cosine"  # warmup then cosine to the end; "wsd": warmup, constant, cosine over decay_steps
  c.warmup_steps = 100
  c.decay_steps = 0  # wsd only
  c.final_learning_rate_ratio = 0.1  # the schedule ends at peak × this
  c.qk_clip_tau = 100.0  # muon_clip only; <= 0 (or None) disables the clip
  c.muon_ns_dtype = "bfloat16"  # muon_clip: Newton–Schulz matmul dtype ("float32" for exact comparisons)
  c.muon_ns_impl = "auto"  # "xla" | "pallas" (all steps in VMEM, TPU; interpret mode on CPU) | "auto": pallas on TPU
  c.spread_newton_schulz = True  # muon_clip on a mesh: whole matrices per device (kimi_jax/optim/ns_sharding.py)
  c.weight_decay = 0.1
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.grad_clip_norm = 1.0
  c.router_bias_update_rate = 1e-3  # u in b += u · sign(mean_load − load_e)
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.keep_period = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
  c.init_from = ""  # a model checkpoint (e.g. `kimi_jax.convert hf-to-orbax` output) to start from
  c.sample_tokens = 200  # tokens sampled from the trained model at the end (0: none)
  c.sample_prompt = "And God said, "
  c.sample_temperature = 0.7
  return c


def load_run_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a run configuration file such as configs/kimi_k2.py (what `--config` reads)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig.from_dict(c.model.to_dict())
