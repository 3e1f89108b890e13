"""Parameter, FLOP and token arithmetic for a model preset or a whole run, from the real code.

    python -m kimi_jax.tools.plan --preset kimi_k2 [--seq_len 4096] [--json]
    python -m kimi_jax.tools.plan --config configs/kimi_k2.py [--json] [--config.X=...]

Counts come from `nnx.eval_shape` of the model (nothing is allocated), so they cannot drift from the code. With
--config it also says what the run will do: its rope (YaRN fields, or null for plain RoPE) and softmax scale, the
global batch in tokens, the total tokens and the learning-rate schedule's phases in steps and tokens, with the
rates read from the run's own schedule.
"""

from __future__ import annotations

import json
import math
import sys

from absl import app, flags

from kimi_jax.config import ModelConfig, preset, PRESETS


def abstract_model(cfg: ModelConfig):
  """The model with ShapeDtypeStruct leaves: build it without allocating."""
  from flax import nnx

  from kimi_jax.model import KimiK2

  return nnx.eval_shape(lambda: KimiK2(cfg, rngs=nnx.Rngs(0)))


def _leaves_with_paths(cfg: ModelConfig):
  import jax
  from flax import nnx

  state = nnx.state(abstract_model(cfg), nnx.Variable)  # Params and router biases
  return jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]


# bf16 dense peak FLOP/s per chip (public spec sheets), keyed by a short chip name.
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "a100": 312e12, "h100": 989e12,
              "h200": 989e12}
# HBM per chip, bytes, for the TPUs `kimi_jax.tools.aot` compiles for (spec sheets).
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}
# HBM bandwidth per chip, bytes/s (spec sheets; A100 80 GB SXM, H100 SXM).
HBM_BYTES_PER_S = {"v4": 1.2e12, "v5e": 8.19e11, "v5p": 2.765e12, "v6e": 1.64e12, "a100": 2.04e12, "h100": 3.35e12,
                   "h200": 4.8e12}
_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5p": "v5p", "tpu v5": "v5p",
                 "tpu v6 lite": "v6e", "tpu v6e": "v6e", "a100": "a100", "h100": "h100", "h200": "h200"}


def device_peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of a `jax.Device.device_kind` (e.g. "TPU v5p", "NVIDIA H100 80GB HBM3"); None if unknown
  (CPUs)."""
  kind = device_kind.lower()
  for name in sorted(_DEVICE_KINDS, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS[_DEVICE_KINDS[name]]
  return None


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """total_params (router biases included) and active_params (K of E routed experts per token)."""
  total = routed = 0
  for path, leaf in _leaves_with_paths(cfg):
    size = math.prod(leaf.shape)
    total += size
    if any(getattr(key, "key", None) == "experts" for key in path):
      routed += size
  active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
  return {"total_params": total, "active_params": active}


def matmul_params_per_token(cfg: ModelConfig) -> int:
  """Weights each token multiplies by: active params minus the embedding lookup, norms and biases."""
  d = cfg.hidden_size
  h, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  attn = (d * cfg.q_lora_rank + cfg.q_lora_rank * h * (dn + dr) + d * (cfg.kv_lora_rank + dr)
          + cfg.kv_lora_rank * h * (dn + dv) + h * dv * d)
  dense_mlp = 3 * d * cfg.intermediate_size
  moe = (3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
         + d * cfg.n_routed_experts)
  return (cfg.num_hidden_layers * attn + cfg.num_dense_layers * dense_mlp + cfg.num_moe_layers * moe
          + d * cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward = 3 × forward), causal attention counted once.

  Forward: 2 FLOPs per matmul weight, plus q·k and p·v over the (seq_len + 1) / 2 keys a token sees on average.
  """
  attn_pairs = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  forward = 2 * matmul_params_per_token(cfg) + 2 * attn_pairs * (seq_len + 1) / 2
  return 3 * forward


def rope_report(cfg: ModelConfig) -> dict | None:
  """The YaRN fields this run applies (HF rope_scaling names), or None for plain RoPE."""
  if not cfg.yarn_active:
    return None
  return {"type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow,
          "mscale": cfg.rope_mscale, "mscale_all_dim": cfg.rope_mscale_all_dim,
          "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}


def run_report(c) -> dict:
  """What run config `c` (an ml_collections ConfigDict of kimi_jax.train) will do."""
  from kimi_jax.train import learning_rate_schedule, schedule_phases
  from kimi_jax.train_config import model_config

  cfg = model_config(c)
  batch_tokens = c.batch_size * c.seq_len
  schedule = learning_rate_schedule(c)
  phases = [{"phase": name, "steps": [start, end], "tokens": [start * batch_tokens, end * batch_tokens],
             "learning_rate": [float(schedule(start)), float(schedule(end))]}
            for name, start, end in schedule_phases(c)]
  return {**count_params(cfg), "train_flops_per_token": train_flops_per_token(cfg, c.seq_len),
          "seq_len": c.seq_len, "rope_scaling": rope_report(cfg), "softmax_scale": cfg.softmax_scale,
          "global_batch_sequences": c.batch_size, "global_batch_tokens": batch_tokens,
          "microbatches": c.microbatches, "steps": c.steps, "total_tokens": c.steps * batch_tokens,
          "optimizer": c.optimizer, "schedule": phases}


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
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Run configuration file (configs/*.py); overrides --preset.")
  flags.DEFINE_enum("preset", "kimi_k2", sorted(PRESETS), "Model preset to plan (without --config).")
  flags.DEFINE_integer("seq_len", 4096, "Sequence length for the FLOP count (without --config).")
  flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
  app.run(main)
