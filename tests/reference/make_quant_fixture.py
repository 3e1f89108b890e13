"""Generate the quantised reference fixtures: tiny Kimi-K2-shaped checkpoints in the FP8 and INT4 release layouts,
with transformers' float32 logits computed on the dequantised weights.

    /work/refenv/bin/python tests/reference/make_quant_fixture.py      # from the repo root, CPU, no network

Writes, next to this file:
* ``data/tiny_fp8/``: Kimi-K2-Instruct layout. ``quantization_config`` = {quant_method fp8, fmt e4m3,
  activation_scheme dynamic, weight_block_size [128, 128]}. Every linear weight of attention, the dense MLP, the
  routed and the shared experts is ``float8_e4m3fn`` with ``<name>_scale_inv`` F32 [ceil(out/128), ceil(in/128)];
  router (``mlp.gate.weight``), embedding, lm_head and norms are BF16, ``e_score_correction_bias`` F32. Sizes are
  chosen so most weights have partial edge blocks (hidden 160, q_lora 144, intermediate 192, experts 72 wide).
* ``data/tiny_int4/``: Kimi-K2-Thinking layout. compressed-tensors ``pack-quantized`` config (symmetric int4,
  group 32, ``ignore`` = lm_head, self_attn, shared_experts, dense mlp). Only routed experts are quantised:
  ``...proj.weight_packed`` I32 [out, in/8], ``weight_scale`` BF16 [out, in/32], ``weight_shape`` I32 [2].
* each with ``reference.npz``: ``tokens`` int32 [2, 12], ``logits`` f32 [2, 12, V] from DeepseekV3ForCausalLM in
  float32 (eager attention and experts) holding the dequantised weights, and ``dequant/<name>`` f32 for two
  weights (a spot check of the dequantisation itself).

Quantisation here follows the release formats; dequantisation is written independently from
KIMI_K2_FACTS.md ("Checkpoint format") and applied to the tensors read back from the written files:
FP8 W = Wq · S[i // 128, j // 128]; INT4 value 8g + i in int32 column g at bits [4i, 4i + 4) as nibble q + 8,
W = (nibble − 8) · scale[row, col // 32]. The dequantised float model is saved without quantization_config and
loaded with ``from_pretrained`` (registering the deepseek_v3 per-expert conversion for model_type kimi_k2, see
README.md), and every loaded tensor is checked against the dequantised values.
Deterministic (seeded); the total size is asserted < 1.5 MB.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
import sys
import tempfile

import numpy as np
from safetensors.torch import load_file, save_file
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# One weight generator for every fixture; importing make_fixture also registers the kimi_k2 -> deepseek_v3
# expert mapping that transformers 5.23 needs to load per-expert tensors.
from make_fixture import gen_weights  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 20250801
BATCH, SEQ = 2, 12
FP8_BLOCK = 128
INT4_GROUP = 32

BASE = {
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": False,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "initializer_range": 0.02,
  "max_position_embeddings": 131072,
  "model_type": "kimi_k2",
  "moe_layer_freq": 1,
  "n_group": 1,
  "n_shared_experts": 1,
  "norm_topk_prob": True,
  "num_nextn_predict_layers": 0,
  "num_hidden_layers": 3,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
  },
  "rope_theta": 50000.0,
  "routed_scaling_factor": 2.827,
  "scoring_func": "sigmoid",
  "seq_aux": True,
  "tie_word_embeddings": False,
  "topk_group": 1,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "use_cache": True,
  "vocab_size": 128,
  "num_experts_per_tok": 2,
}
FP8_CONFIG = {
  **BASE,
  "hidden_size": 160,
  "intermediate_size": 192,
  "moe_intermediate_size": 72,
  "n_routed_experts": 4,
  "num_attention_heads": 2,
  "num_key_value_heads": 2,
  "q_lora_rank": 144,
  "kv_lora_rank": 48,
  "qk_nope_head_dim": 32,
  "qk_rope_head_dim": 16,
  "v_head_dim": 32,
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
  },
}
INT4_CONFIG = {
  **BASE,
  "hidden_size": 64,
  "intermediate_size": 128,
  "moe_intermediate_size": 32,
  "n_routed_experts": 8,
  "num_attention_heads": 4,
  "num_key_value_heads": 4,
  "q_lora_rank": 32,
  "kv_lora_rank": 16,
  "qk_nope_head_dim": 16,
  "qk_rope_head_dim": 8,
  "v_head_dim": 16,
  "quantization_config": {
    "config_groups": {
      "group_0": {
        "input_activations": None,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": {
          "actorder": None,
          "block_structure": None,
          "dynamic": False,
          "group_size": INT4_GROUP,
          "num_bits": 4,
          "observer": "minmax",
          "observer_kwargs": {},
          "strategy": "group",
          "symmetric": True,
          "type": "int",
        },
      }
    },
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
  },
}


# Quantisation (the release formats) ------------------------------------------------------------------------------


def fp8_quantised(name: str) -> bool:
  return name.endswith(("_proj.weight", "_proj_with_mqa.weight"))  # all linears but the router and lm_head


def quantise_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  r, c = w.shape
  nr, nc = math.ceil(r / FP8_BLOCK), math.ceil(c / FP8_BLOCK)
  padded = torch.zeros(nr * FP8_BLOCK, nc * FP8_BLOCK)
  padded[:r, :c] = w.float()
  blocks = padded.reshape(nr, FP8_BLOCK, nc, FP8_BLOCK)
  scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # [nr, nc]
  q = (blocks / scale[:, None, :, None]).clamp(-448, 448).reshape(nr * FP8_BLOCK, nc * FP8_BLOCK)[:r, :c]
  return q.to(torch.float8_e4m3fn), scale.float()


def int4_quantised(name: str) -> bool:
  return ".mlp.experts." in name


def quantise_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  r, c = w.shape
  groups = w.float().reshape(r, c // INT4_GROUP, INT4_GROUP)
  scale = (groups.abs().amax(dim=2) / 7.0).to(torch.bfloat16)  # [r, c/32]
  q = torch.round(groups / scale.float()[:, :, None]).clamp(-8, 7).reshape(r, c).to(torch.int64)
  nib = q + 8
  packed = torch.zeros(r, c // 8, dtype=torch.int64)
  for i in range(8):
    packed |= nib[:, i::8] << (4 * i)
  packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # reinterpret as int32
  return packed, scale, torch.tensor([r, c], dtype=torch.int32)


# Dequantisation, independently from the facts, on the tensors as read back from the files ---------------------


def dequantise_fp8(wq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
  r, c = wq.shape
  full = s.repeat_interleave(FP8_BLOCK, 0)[:r].repeat_interleave(FP8_BLOCK, 1)[:, :c]
  return wq.to(torch.float32) * full


def dequantise_int4(packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
  r, c = (int(v) for v in shape)
  words = packed.to(torch.int64) & 0xFFFFFFFF
  nib = torch.empty(r, c, dtype=torch.int64)
  for i in range(8):
    nib[:, i::8] = (words >> (4 * i)) & 0xF
  return (nib - 8).to(torch.float32) * scale.to(torch.float32).repeat_interleave(INT4_GROUP, 1)


# -------------------------------------------------------------------------------------------------------------------


def write_release(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
  out.mkdir(parents=True, exist_ok=True)
  for old in out.glob("*.safetensors"):
    old.unlink()
  with open(out / "config.json", "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  last = config["num_hidden_layers"] - 1
  names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
  shards: list[dict[str, torch.Tensor]] = [{}, {}]
  for name, t in tensors.items():
    second = name.startswith(f"model.layers.{last}.") or name in ("model.norm.weight", "lm_head.weight")
    shards[int(second)][name] = t.contiguous()
  weight_map = {}
  for fname, sd in zip(names, shards):
    save_file(sd, str(out / fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in sd})
  total = sum(t.numel() * t.element_size() for t in tensors.values())
  with open(out / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    f.write("\n")


def read_release(out: Path) -> dict[str, torch.Tensor]:
  tensors = {}
  for f in sorted(out.glob("*.safetensors")):
    tensors.update(load_file(str(f)))
  return tensors


@torch.no_grad()
def reference_logits(config: dict, weights: dict[str, torch.Tensor], tokens: np.ndarray) -> np.ndarray:
  """transformers' float32 logits for the float weights `weights` (checked to load exactly)."""
  plain = copy.deepcopy(config)
  del plain["quantization_config"]
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(plain, f)
    save_file(
      {k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"}
    )
    cfg = DeepseekV3Config.from_pretrained(tmp)
    model, info = DeepseekV3ForCausalLM.from_pretrained(
      tmp,
      config=cfg,
      dtype=torch.float32,
      attn_implementation="eager",
      experts_implementation="eager",
      output_loading_info=True,
    )
  for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(k), f"load problem {k}: {info.get(k)}"
  model.eval()
  sd = model.state_dict()
  f = config["moe_intermediate_size"]
  for name, t in weights.items():
    if ".mlp.experts." in name:
      layer, rest = name.split(".mlp.experts.")
      e, proj = int(rest.split(".")[0]), rest.split(".")[1]
      fused = sd[f"{layer}.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"][e]
      loaded = fused if proj == "down_proj" else (fused[:f] if proj == "gate_proj" else fused[f:])
    else:
      loaded = sd[name]
    assert torch.equal(loaded, t.to(torch.float32)), f"loaded tensor differs: {name}"
  return model(input_ids=torch.from_numpy(tokens).long(), use_cache=False).logits.numpy().astype(np.float32)


def make(kind: str, config: dict, seed: int, spot: list[str]) -> None:
  out = HERE / "data" / f"tiny_{kind}"
  w = gen_weights(config, seed)
  stored: dict[str, torch.Tensor] = {}
  for name, t in w.items():
    if kind == "fp8" and fp8_quantised(name):
      stored[name], stored[name + "_scale_inv"] = quantise_fp8(t)
    elif kind == "int4" and int4_quantised(name):
      base = name  # "...proj.weight" -> "...proj.weight_packed" etc.
      stored[base + "_packed"], stored[base + "_scale"], stored[base + "_shape"] = quantise_int4(t)
    else:
      stored[name] = t
  write_release(out, config, stored)

  files = read_release(out)
  deq: dict[str, torch.Tensor] = {}
  for name in w:
    if name in files and name + "_scale_inv" in files:
      assert files[name].dtype == torch.float8_e4m3fn
      deq[name] = dequantise_fp8(files[name], files[name + "_scale_inv"])
    elif name + "_packed" in files:
      deq[name] = dequantise_int4(files[name + "_packed"], files[name + "_scale"], files[name + "_shape"])
    else:
      deq[name] = files[name].to(torch.float32)
  quantised = [n for n in w if not torch.equal(deq[n], w[n].float())]
  assert len(quantised) >= (30 if kind == "fp8" else 40), (kind, len(quantised))
  if kind == "fp8":
    partial = [n for n in w if n + "_scale_inv" in files and any(d % FP8_BLOCK for d in files[n].shape)]
    assert len(partial) >= 20, partial

  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config["vocab_size"], size=(BATCH, SEQ)).astype(np.int32)
  logits = reference_logits(config, deq, tokens)
  assert np.all(np.isfinite(logits))
  np.savez(out / "reference.npz", tokens=tokens, logits=logits, **{f"dequant/{n}": deq[n].numpy() for n in spot})
  size = sum(p.stat().st_size for p in out.iterdir())
  print(f"{out}: {len(quantised)} quantised weights, logits std {logits.std():.3f}, {size:,} bytes")


def main() -> None:
  torch.manual_seed(SEED)
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  make(
    "fp8",
    FP8_CONFIG,
    SEED,
    ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.1.mlp.experts.2.down_proj.weight"],
  )
  make(
    "int4",
    INT4_CONFIG,
    SEED + 1,
    ["model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.2.mlp.experts.5.down_proj.weight"],
  )
  total = sum(p.stat().st_size for d in ("tiny_fp8", "tiny_int4") for p in (HERE / "data" / d).iterdir())
  print(f"total {total:,} bytes")
  assert total < 1_500_000, total


if __name__ == "__main__":
  main()
