"""Parameter, FLOP and token arithmetic for a model preset or a whole run, from the real code.

    python -m kimi_jax.tools.plan --preset kimi_k2 [--seq_len 4096] [--json]
    python -m kimi_jax.tools.plan --config configs/kimi_k2.py [--json] [--config.X=...]

Counts come from `nnx.eval_shape` of the model (`kimi_jax.model_stats`; nothing is allocated), so they cannot drift
from the code. With --config it also says what the run will do: its rope (YaRN fields, or null for plain RoPE) and
softmax scale, the global batch in tokens, the total tokens and the learning-rate schedule's phases in steps and
tokens, with the rates read from the run's own schedule.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from kimi_jax import cli_flags  # noqa: F401 (the shared --config and --json)
from kimi_jax.config import PRESETS, ModelConfig, preset
from kimi_jax.model_stats import count_params, train_flops_per_token

# Flags (`python -m kimi_jax.tools.plan`); --config (which overrides --preset) and --json are shared.
flags.DEFINE_enum("preset", "kimi_k2", sorted(PRESETS), "Model preset to plan (without --config).")
flags.DEFINE_integer("seq_len", 4096, "Sequence length for the FLOP count (without --config).")


def rope_report(cfg: ModelConfig) -> dict | None:
  """The YaRN fields this run applies (HF rope_scaling names), or None for plain RoPE."""
  if not cfg.yarn_active:
    return None
  return {
    "type": "yarn",
    "factor": cfg.rope_factor,
    "beta_fast": cfg.rope_beta_fast,
    "beta_slow": cfg.rope_beta_slow,
    "mscale": cfg.rope_mscale,
    "mscale_all_dim": cfg.rope_mscale_all_dim,
    "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
  }


def run_report(c) -> dict:
  """What run config `c` (an ml_collections ConfigDict of kimi_jax.train) will do."""
  from kimi_jax.train_config import model_config
  from kimi_jax.training.optimizer import learning_rate_schedule, schedule_phases

  cfg = model_config(c)
  batch_tokens = c.batch_size * c.seq_len
  schedule = learning_rate_schedule(c)
  phases = [
    {
      "phase": name,
      "steps": [start, end],
      "tokens": [start * batch_tokens, end * batch_tokens],
      "learning_rate": [float(schedule(start)), float(schedule(end))],
    }
    for name, start, end in schedule_phases(c)
  ]
  return {
    **count_params(cfg),
    "train_flops_per_token": train_flops_per_token(cfg, c.seq_len),
    "seq_len": c.seq_len,
    "rope_scaling": rope_report(cfg),
    "softmax_scale": cfg.softmax_scale,
    "global_batch_sequences": c.batch_size,
    "global_batch_tokens": batch_tokens,
    "microbatches": c.microbatches,
    "steps": c.steps,
    "total_tokens": c.steps * batch_tokens,
    "optimizer": c.optimizer,
    "schedule": phases,
  }


def main(argv):
  del argv
  f = flags.FLAGS
  if f.config is not None:
    report = run_report(f.config)
  else:
    cfg = preset(f.preset)
    report = count_params(cfg)
    report["train_flops_per_token"] = train_flops_per_token(cfg, f.seq_len)
    report["seq_len"] = f.seq_len
  if f.json:
    print(json.dumps(report))
  else:
    for key, value in report.items():
      if key == "schedule":
        for phase in value:
          (a, b), (ta, tb), (la, lb) = phase["steps"], phase["tokens"], phase["learning_rate"]
          print(f"{phase['phase']:>24}  steps {a:,}-{b:,}, tokens {ta:.4g}-{tb:.4g}, lr {la:.3g} -> {lb:.3g}")
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        print(f"{key:>24}  {value:,.0f}" if abs(value) >= 1 else f"{key:>24}  {value:.6g}")
      else:
        print(f"{key:>24}  {value}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
