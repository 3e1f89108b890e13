"""Generate the Hugging Face transformers reference fixtures for kimi-jax.

What it writes (into ``tests/reference/data/tiny_hf/``, next to this file)
-------------------------------------------------------------------------
* ``config.json``: a tiny Kimi-K2-shaped config in the layout of the released
  ``moonshotai/Kimi-K2-Instruct/config.json`` (``"model_type": "kimi_k2"``,
  ``"architectures": ["DeepseekV3ForCausalLM"]``, legacy ``rope_scaling`` + top-level
  ``rope_theta``), with every Kimi value kept (rope_theta 50000, YaRN factor 32 /
  beta_fast 1 / beta_slow 1 / mscale 1 / mscale_all_dim 1 / original_max_position_embeddings
  4096, max_position_embeddings 131072, routed_scaling_factor 2.827, sigmoid / noaux_tc,
  n_group 1, topk_group 1, norm_topk_prob, rms_norm_eps 1e-6, first_k_dense_replace 1) and
  only the sizes shrunk (vocab 256, hidden 64, 3 layers, 4 heads, q_lora 32, kv_lora 16,
  nope 16 / rope 8 / v 16, intermediate 128, moe_intermediate 32, 8 routed experts, top-2,
  1 shared expert).  bos/eos are REMAPPED to 1/2 (the real 163584/163585 do not fit in a
  256-token vocab).  ``auto_map`` and ``quantization_config`` of the release are omitted
  (no remote code is shipped and the weights are BF16, not FP8).
* ``model-00001-of-00002.safetensors``, ``model-00002-of-00002.safetensors`` and
  ``model.safetensors.index.json`` (``weight_map`` + ``metadata.total_size`` in bytes): random
  weights with the released tensor names -- per-expert
  ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` (NOT transformers' fused
  ``gate_up_proj``), ``mlp.shared_experts.*``, ``mlp.gate.weight`` and
  ``mlp.gate.e_score_correction_bias``; Linear weights are [out, in].  Every tensor is BF16
  except ``e_score_correction_bias`` (F32).  Shard 1 holds the embedding and layers 0-1,
  shard 2 holds layer 2, ``model.norm.weight`` and ``lm_head.weight``.
* ``reference.npz``: transformers' FLOAT32 outputs (weights upcast from the BF16 files, eager
  attention, eager experts loop, eval mode) for ``tokens`` [2, 12] plus per-component
  intermediates.  See ``tests/reference/README.md`` for every key, shape and convention.

How to regenerate (CPU only, no network needed: the model is built from config.json)
--------------------------------------------------------------------------------------
    python3.11 -m venv /work/refenv
    /work/refenv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy
    /work/refenv/bin/python tests/reference/make_fixture.py        # from the repo root

The script is deterministic (torch / numpy seeded, fixed tensor generation order); running it
again with the same versions reproduces the files bit for bit.  It asserts, before writing
``reference.npz``, that:
  * ``DeepseekV3ForCausalLM.from_pretrained`` loads the per-expert files with no missing /
    unexpected / mismatched keys and every parameter / buffer equals the written tensor
    (experts compared against ``cat(gate_E, up_E)`` / ``down_E`` after transformers' fusion);
  * the capturing attention function leaves logits bit-identical to plain ``eager``;
  * >= 30 % of (token, MoE layer) top-k selections differ between topk(s) and topk(s + bias);
  * an independent NumPy float64 forward written from KIMI_K2_FACTS.md (pairwise-interleaved
    RoPE, YaRN formula, 192^-0.5*m^2-style scale, sigmoid/noaux_tc router) matches
    transformers' logits and every captured intermediate.
Nothing in the kimi_jax package or CI imports torch; only this script does.

Loading note: transformers 5.23 has no ``kimi_k2`` model type registered (AutoConfig /
AutoModelForCausalLM raise ValueError on it), so the script loads with
``DeepseekV3Config.from_pretrained(dir)`` + ``DeepseekV3ForCausalLM.from_pretrained(dir, config=cfg,
dtype=torch.float32)`` (5.x spells ``torch_dtype`` as ``dtype``); the files keep
``"model_type": "kimi_k2"`` as released.  Because the config instance then carries
``model_type == "kimi_k2"``, transformers finds no per-expert -> fused-expert conversion mapping and
would silently re-initialise every routed expert at random (a load-report warning only); the script
registers the ``deepseek_v3`` mapping for ``kimi_k2`` (``register_checkpoint_conversion_mapping``)
and then checks every loaded tensor against the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.torch import save_file
import torch
import transformers
from transformers import AttentionInterface, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mdsv3

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "data" / "tiny_hf"
SEED = 20250701

# --------------------------------------------------------------------------------------------
# Config (released Kimi-K2-Instruct layout, tiny sizes, all Kimi hyper-parameters kept)
# --------------------------------------------------------------------------------------------
CONFIG = {
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": False,
  "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001,
  "bos_token_id": 1,  # remapped: real Kimi id 163584 does not fit in vocab 256
  "eos_token_id": 2,  # remapped: real Kimi id 163585
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 128,
  "kv_lora_rank": 16,
  "max_position_embeddings": 131072,
  "model_type": "kimi_k2",
  "moe_intermediate_size": 32,
  "moe_layer_freq": 1,
  "n_group": 1,
  "n_routed_experts": 8,
  "n_shared_experts": 1,
  "norm_topk_prob": True,
  "num_attention_heads": 4,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 3,
  "num_key_value_heads": 4,
  "num_nextn_predict_layers": 0,
  "pretraining_tp": 1,
  "q_lora_rank": 32,
  "qk_nope_head_dim": 16,
  "qk_rope_head_dim": 8,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
    "rope_type": "yarn",
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
  "v_head_dim": 16,
  "vocab_size": 256,
}

BATCH, SEQ = 2, 12
BIAS_STD = 0.15  # e_score_correction_bias ~ N(0, 0.15^2): comparable to the spread of sigmoid scores


def gen_weights(c: dict, seed: int) -> dict[str, torch.Tensor]:
  """Random weights for config `c` in the released layout, generated in a fixed order (float32 -> bf16).
  Shared with make_quant_fixture.py and make_generate_fixture.py."""
  g = torch.Generator().manual_seed(seed)
  D, H = c["hidden_size"], c["num_attention_heads"]
  nope, rope, vdim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
  qr, kvr = c["q_lora_rank"], c["kv_lora_rank"]
  E, Im, I = c["n_routed_experts"], c["moe_intermediate_size"], c["intermediate_size"]

  w: dict[str, torch.Tensor] = {}

  def lin(name, out_f, in_f):
    w[name] = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)

  def norm(name, n):
    w[name] = (1.0 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

  w["model.embed_tokens.weight"] = torch.randn(c["vocab_size"], D, generator=g).to(torch.bfloat16)
  for n in range(c["num_hidden_layers"]):
    p = f"model.layers.{n}."
    norm(p + "input_layernorm.weight", D)
    norm(p + "post_attention_layernorm.weight", D)
    a = p + "self_attn."
    lin(a + "q_a_proj.weight", qr, D)
    norm(a + "q_a_layernorm.weight", qr)
    lin(a + "q_b_proj.weight", H * (nope + rope), qr)
    lin(a + "kv_a_proj_with_mqa.weight", kvr + rope, D)
    norm(a + "kv_a_layernorm.weight", kvr)
    lin(a + "kv_b_proj.weight", H * (nope + vdim), kvr)
    lin(a + "o_proj.weight", D, H * vdim)
    m = p + "mlp."
    if n < c["first_k_dense_replace"]:
      lin(m + "gate_proj.weight", I, D)
      lin(m + "up_proj.weight", I, D)
      lin(m + "down_proj.weight", D, I)
    else:
      lin(m + "gate.weight", E, D)
      w[m + "gate.e_score_correction_bias"] = (BIAS_STD * torch.randn(E, generator=g)).to(torch.float32)
      for e in range(E):
        lin(m + f"experts.{e}.gate_proj.weight", Im, D)
        lin(m + f"experts.{e}.up_proj.weight", Im, D)
        lin(m + f"experts.{e}.down_proj.weight", D, Im)
      si = Im * c["n_shared_experts"]
      lin(m + "shared_experts.gate_proj.weight", si, D)
      lin(m + "shared_experts.up_proj.weight", si, D)
      lin(m + "shared_experts.down_proj.weight", D, si)
  norm("model.norm.weight", D)
  w["lm_head.weight"] = (torch.randn(c["vocab_size"], D, generator=g) / D**0.5).to(torch.bfloat16)
  return w


def _write_checkpoint(w: dict[str, torch.Tensor]) -> None:
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  with open(OUT_DIR / "config.json", "w") as f:
    json.dump(CONFIG, f, indent=2, sort_keys=True)
    f.write("\n")
  last = CONFIG["num_hidden_layers"] - 1
  shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
  shards: list[dict[str, torch.Tensor]] = [{}, {}]
  for name, t in w.items():
    second = name.startswith(f"model.layers.{last}.") or name in ("model.norm.weight", "lm_head.weight")
    shards[int(second)][name] = t.contiguous()
  weight_map = {}
  for fname, sd in zip(shard_names, shards):
    save_file(sd, str(OUT_DIR / fname), metadata={"format": "pt"})
    for name in sd:
      weight_map[name] = fname
  total = sum(t.numel() * t.element_size() for t in w.values())
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  with open(OUT_DIR / "model.safetensors.index.json", "w") as f:
    json.dump(index, f, indent=2)
    f.write("\n")


def _load_and_verify(w: dict[str, torch.Tensor], attn: str):
  cfg = DeepseekV3Config.from_pretrained(str(OUT_DIR))
  model, info = DeepseekV3ForCausalLM.from_pretrained(
    str(OUT_DIR),
    config=cfg,
    dtype=torch.float32,
    attn_implementation=attn,
    experts_implementation="eager",
    output_loading_info=True,
  )
  model.eval()
  for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(k), f"load problem {k}: {info.get(k)}"
  sd = model.state_dict()
  seen = set()
  for name, t in w.items():
    m = None
    if ".mlp.experts." in name:
      layer, rest = name.split(".mlp.experts.")
      e, proj = rest.split(".")[0], rest.split(".")[1]
      e = int(e)
      if proj == "down_proj":
        key = f"{layer}.mlp.experts.down_proj"
        m = sd[key][e]
      else:
        key = f"{layer}.mlp.experts.gate_up_proj"
        half = CONFIG["moe_intermediate_size"]
        m = sd[key][e, :half] if proj == "gate_proj" else sd[key][e, half:]
      seen.add(key)
    else:
      key = name
      m = sd[key]
      seen.add(key)
    assert m.dtype == torch.float32, (name, m.dtype)
    assert torch.equal(m, t.to(torch.float32)), f"loaded tensor differs: {name}"
  leftover = set(sd) - seen
  assert not leftover, f"parameters not covered by the checkpoint (would be freshly initialised): {leftover}"
  assert model.config.rope_parameters["rope_type"] == "yarn"
  assert model.config.rope_interleave is True
  return model


# --------------------------------------------------------------------------------------------
# Capture of per-head max logits through a registered attention function
# --------------------------------------------------------------------------------------------
MAX_LOGITS: dict[int, torch.Tensor] = {}
QK_STATES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _capture_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
  # query/key: [B, H, S, 24] post-RoPE (rope part in HALF layout, see README); no cache, no padding.
  logits = torch.matmul(query, key.transpose(2, 3)) * scaling
  s_q, s_k = query.shape[2], key.shape[2]
  causal = torch.ones(s_q, s_k, dtype=torch.bool).tril()
  masked = logits.masked_fill(~causal, float("-inf"))
  MAX_LOGITS[module.layer_idx] = masked.amax(dim=(0, 2, 3)).detach().clone()
  QK_STATES[module.layer_idx] = (query.detach().clone(), key.detach().clone())
  return mdsv3.eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


AttentionInterface.register("kimi_capture_eager", _capture_eager)

# PITFALL (transformers 5.23): DeepseekV3Config.from_pretrained keeps ``model_type = "kimi_k2"`` on the config
# instance, and the per-expert -> fused (gate_up_proj / down_proj) weight conversion is looked up by that
# model_type.  No mapping exists for "kimi_k2", so without the line below every routed expert is reported
# UNEXPECTED + MISSING and silently re-initialised at random (only a load-report warning).  Register the
# deepseek_v3 mapping (MergeModulelist + Concatenate(gate, up)) for "kimi_k2" too.
register_checkpoint_conversion_mapping("kimi_k2", get_checkpoint_conversion_mapping("deepseek_v3"))
ALL_MASK_ATTENTION_FUNCTIONS.register("kimi_capture_eager", eager_mask)


# --------------------------------------------------------------------------------------------
# Independent NumPy (float64) forward written from KIMI_K2_FACTS.md, used as a cross-check
# --------------------------------------------------------------------------------------------
def _np_yarn_inv_freq(d, theta, factor, beta_fast, beta_slow, l_orig):
  import math

  def corr(n):
    return d * math.log(l_orig / (2 * math.pi * n)) / (2 * math.log(theta))

  low = max(math.floor(corr(beta_fast)), 0)
  high = min(math.ceil(corr(beta_slow)), d - 1)
  if low == high:
    high += 0.001
  i = np.arange(d // 2, dtype=np.float64)
  ramp = np.clip((i - low) / (high - low), 0, 1)
  base = theta ** (-2 * i / d)
  return base * ((1 - ramp) + ramp / factor)


def _np_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _np_rope_pairs(x, cos, sin):
  """Interleaved pairs (2i, 2i+1) rotated by angle i; output stays interleaved. cos/sin [S, d/2]."""
  x1, x2 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x1 * cos - x2 * sin
  out[..., 1::2] = x2 * cos + x1 * sin
  return out


def _np_silu(x):
  return x / (1 + np.exp(-x))


def _np_forward(wt: dict[str, np.ndarray], tokens: np.ndarray):
  c = CONFIG
  D, H = c["hidden_size"], c["num_attention_heads"]
  nope, rope, vdim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
  kvr, eps, K = c["kv_lora_rank"], c["rms_norm_eps"], c["num_experts_per_tok"]
  rs = c["rope_scaling"]
  inv = _np_yarn_inv_freq(
    rope, c["rope_theta"], rs["factor"], rs["beta_fast"], rs["beta_slow"], rs["original_max_position_embeddings"]
  )
  m = 0.1 * rs["mscale_all_dim"] * np.log(rs["factor"]) + 1
  scale = (nope + rope) ** -0.5 * m * m
  B, S = tokens.shape
  ang = np.arange(S)[:, None] * inv[None, :]
  cos, sin = np.cos(ang), np.sin(ang)
  out = {"inv_freq": inv, "scale": scale}
  x = wt["model.embed_tokens.weight"][tokens]
  causal = np.tril(np.ones((S, S), dtype=bool))
  for n in range(c["num_hidden_layers"]):
    p = f"model.layers.{n}."
    a = p + "self_attn."
    h = _np_rms(x, wt[p + "input_layernorm.weight"], eps)
    out[f"layer{n}_attn_in"] = h
    q = _np_rms(h @ wt[a + "q_a_proj.weight"].T, wt[a + "q_a_layernorm.weight"], 1e-6)
    q = (q @ wt[a + "q_b_proj.weight"].T).reshape(B, S, H, nope + rope)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    ckv = h @ wt[a + "kv_a_proj_with_mqa.weight"].T
    lat, k_pe = ckv[..., :kvr], ckv[..., kvr:]
    kv = _np_rms(lat, wt[a + "kv_a_layernorm.weight"], 1e-6) @ wt[a + "kv_b_proj.weight"].T
    kv = kv.reshape(B, S, H, nope + vdim)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q_pe = _np_rope_pairs(q_pe, cos[None, :, None, :], sin[None, :, None, :])
    k_pe = _np_rope_pairs(k_pe, cos[None], sin[None])  # [B, S, rope], shared by all heads
    half = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    out[f"layer{n}_query_states"] = np.concatenate([q_nope, q_pe[..., half]], -1).transpose(0, 2, 1, 3)
    k_pe_h = np.broadcast_to(k_pe[:, :, None, :], (B, S, H, rope))[..., half]
    out[f"layer{n}_key_states"] = np.concatenate([k_nope, k_pe_h], -1).transpose(0, 2, 1, 3)
    logits = (np.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + np.einsum("bqhd,bkd->bhqk", q_pe, k_pe)) * scale
    logits = np.where(causal, logits, -np.inf)
    out[f"layer{n}_max_logits"] = logits.max(axis=(0, 2, 3))
    pr = np.exp(logits - logits.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(B, S, H * vdim) @ wt[a + "o_proj.weight"].T
    out[f"layer{n}_attn_out"] = o
    x = x + o
    h = _np_rms(x, wt[p + "post_attention_layernorm.weight"], eps)
    out[f"layer{n}_mlp_in"] = h
    mp = p + "mlp."

    def mlp(z, pre):
      return (_np_silu(z @ wt[pre + "gate_proj.weight"].T) * (z @ wt[pre + "up_proj.weight"].T)) @ wt[
        pre + "down_proj.weight"
      ].T

    if n < c["first_k_dense_replace"]:
      y = mlp(h, mp)
    else:
      t = h.reshape(B * S, D)
      s = 1 / (1 + np.exp(-(t @ wt[mp + "gate.weight"].T)))
      choice = s + wt[mp + "gate.e_score_correction_bias"]
      idx = np.sort(np.argsort(-choice, axis=-1, kind="stable")[:, :K], axis=-1)
      wsel = np.take_along_axis(s, idx, axis=-1)
      wsel = wsel / (wsel.sum(-1, keepdims=True) + 1e-20) * c["routed_scaling_factor"]
      routed = np.zeros_like(t)
      for r in range(t.shape[0]):
        for j in range(K):
          routed[r] += wsel[r, j] * mlp(t[r], mp + f"experts.{idx[r, j]}.")
      shared = mlp(t, mp + "shared_experts.")
      out[f"layer{n}_router_scores"] = s
      out[f"layer{n}_topk_idx"] = idx
      out[f"layer{n}_topk_weight"] = wsel
      out[f"layer{n}_routed_out"] = routed
      out[f"layer{n}_shared_out"] = shared
      y = (routed + shared).reshape(B, S, D)
    out[f"layer{n}_mlp_out"] = y
    x = x + y
  out["final_pre_norm"] = x
  out["logits"] = _np_rms(x, wt["model.norm.weight"], eps) @ wt["lm_head.weight"].T
  return out


# --------------------------------------------------------------------------------------------
@torch.no_grad()
def main() -> None:
  torch.manual_seed(SEED)
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  rng = np.random.default_rng(SEED)
  c = CONFIG
  L, H, rope = c["num_hidden_layers"], c["num_attention_heads"], c["qk_rope_head_dim"]
  K = c["num_experts_per_tok"]

  w = gen_weights(CONFIG, SEED)
  _write_checkpoint(w)

  model = _load_and_verify(w, "kimi_capture_eager")
  plain = _load_and_verify(w, "eager")

  tokens = rng.integers(0, c["vocab_size"], size=(BATCH, SEQ), dtype=np.int64)
  tok_t = torch.from_numpy(tokens)

  cap: dict[str, torch.Tensor] = {}
  hooks = []

  def save_out(name, idx=None):
    def fn(mod, args, output):
      o = output if idx is None else output[idx]
      cap[name] = tuple(t.detach().clone() for t in o) if isinstance(o, tuple) else o.detach().clone()

    return fn

  def save_in(name):
    def fn(mod, args, kwargs):
      x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
      cap[name] = x.detach().clone()

    return fn

  for i, layer in enumerate(model.model.layers):
    hooks.append(layer.self_attn.register_forward_pre_hook(save_in(f"layer{i}_attn_in"), with_kwargs=True))
    hooks.append(layer.self_attn.register_forward_hook(save_out(f"layer{i}_attn_out", 0)))
    hooks.append(layer.mlp.register_forward_pre_hook(save_in(f"layer{i}_mlp_in"), with_kwargs=True))
    hooks.append(layer.mlp.register_forward_hook(save_out(f"layer{i}_mlp_out")))
    if i >= c["first_k_dense_replace"]:
      hooks.append(layer.mlp.gate.register_forward_hook(save_out(f"layer{i}_gate")))
      hooks.append(layer.mlp.experts.register_forward_hook(save_out(f"layer{i}_routed_out")))
      hooks.append(layer.mlp.shared_experts.register_forward_hook(save_out(f"layer{i}_shared_out")))
  hooks.append(model.model.layers[-1].register_forward_hook(save_out("final_pre_norm")))

  with torch.no_grad():
    out = model(input_ids=tok_t, output_hidden_states=True, use_cache=False)
    out_plain = plain(input_ids=tok_t, output_hidden_states=True, use_cache=False)
  for hk in hooks:
    hk.remove()
  assert torch.equal(out.logits, out_plain.logits), "capturing attention changed the outputs"

  res: dict[str, np.ndarray] = {}
  res["tokens"] = tokens.astype(np.int32)
  res["logits"] = out.logits.numpy().astype(np.float32)
  hs = torch.stack(out.hidden_states).numpy().astype(np.float32)
  assert hs.shape == (L + 1, BATCH, SEQ, c["hidden_size"]), hs.shape
  res["hidden_states"] = hs
  res["final_pre_norm"] = cap["final_pre_norm"].numpy()

  # hidden_states[-1] convention check (post final norm in transformers 5.23)
  post = model.model.norm(cap["final_pre_norm"]).numpy()
  assert np.array_equal(hs[-1], post), "hidden_states[-1] is not post-norm?"
  assert not np.allclose(hs[-1], res["final_pre_norm"])

  # Rotary embedding / scale
  rot = model.model.rotary_emb
  res["yarn_inv_freq"] = rot.inv_freq.numpy().astype(np.float32)
  res["attention_scaling"] = np.float32(rot.attention_scaling)
  res["softmax_scale"] = np.float32(model.model.layers[0].self_attn.scaling)
  pos = torch.arange(SEQ)[None]
  cos, sin = rot(torch.zeros(1, SEQ, c["hidden_size"]), pos)
  res["cos"] = cos[0].numpy().astype(np.float32)  # [12, 8] = cat(freqs, freqs) layout
  res["sin"] = sin[0].numpy().astype(np.float32)
  res["rope_positions"] = np.arange(SEQ, dtype=np.int32)
  # Far positions, where the YaRN-interpolated (lowest) frequencies actually move the angle.
  far = torch.tensor([[0, 1, 100, 1000, 4095, 4096, 10000, 65535, 100000, 131071]])
  cos_far, sin_far = rot(torch.zeros(1, far.shape[1], c["hidden_size"]), far)
  res["rope_far_positions"] = far[0].numpy().astype(np.int32)
  res["cos_far"] = cos_far[0].numpy().astype(np.float32)
  res["sin_far"] = sin_far[0].numpy().astype(np.float32)

  for i in range(L):
    for nm in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
      res[f"layer{i}_{nm}"] = cap[f"layer{i}_{nm}"].numpy()
    res[f"layer{i}_max_logits"] = MAX_LOGITS[i].numpy().astype(np.float32)
    res[f"layer{i}_query_states"] = QK_STATES[i][0].numpy()
    res[f"layer{i}_key_states"] = QK_STATES[i][1].numpy()
    if i >= c["first_k_dense_replace"]:
      router_logits, tw, ti = cap[f"layer{i}_gate"]
      order = torch.argsort(ti, dim=-1)
      res[f"layer{i}_router_scores"] = router_logits.sigmoid().numpy()
      res[f"layer{i}_topk_idx"] = torch.gather(ti, 1, order).numpy().astype(np.int32)
      res[f"layer{i}_topk_weight"] = torch.gather(tw, 1, order).numpy()
      res[f"layer{i}_routed_out"] = cap[f"layer{i}_routed_out"].numpy()
      res[f"layer{i}_shared_out"] = cap[f"layer{i}_shared_out"].reshape(BATCH * SEQ, -1).numpy()
      res[f"layer{i}_e_score_correction_bias"] = model.model.layers[i].mlp.gate.e_score_correction_bias.numpy()

  # RoPE check pair through transformers' own apply function (the one the model uses)
  q_in = torch.from_numpy(rng.standard_normal((1, H, SEQ, rope)).astype(np.float32))
  k_in = torch.from_numpy(rng.standard_normal((1, H, SEQ, rope)).astype(np.float32))
  q_out, k_out = mdsv3.apply_rotary_pos_emb_interleave(q_in, k_in, cos, sin)
  res["rope_q_in"], res["rope_k_in"] = q_in.numpy(), k_in.numpy()
  res["rope_q_out"], res["rope_k_out"] = q_out.numpy(), k_out.numpy()

  # ---------------------------------------------------------------- sanity / cross-checks
  for k, v in res.items():
    if np.issubdtype(np.asarray(v).dtype, np.floating):
      assert np.all(np.isfinite(v)), k
  # RoPE layout: output == half-layout permutation of the pairwise (interleaved) rotation
  half = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
  ang_c, ang_s = res["cos"][:, : rope // 2].astype(np.float64), res["sin"][:, : rope // 2].astype(np.float64)
  pr = _np_rope_pairs(res["rope_q_in"].astype(np.float64), ang_c, ang_s)
  assert np.allclose(res["rope_q_out"], pr[..., half], atol=1e-6), "RoPE layout claim wrong"
  assert not np.allclose(res["rope_q_out"], pr, atol=1e-3)
  assert np.allclose(res["cos"][:, : rope // 2], res["cos"][:, rope // 2 :])
  # Post-RoPE k in attention: its rope part (same for every head) is in half layout
  # Bias-changes-selection check
  diffs, total = 0, 0
  for i in range(c["first_k_dense_replace"], L):
    s = torch.from_numpy(res[f"layer{i}_router_scores"])
    b = torch.from_numpy(res[f"layer{i}_e_score_correction_bias"])
    a0 = torch.sort(torch.topk(s, K, dim=-1).indices, dim=-1).values
    a1 = torch.sort(torch.topk(s + b, K, dim=-1).indices, dim=-1).values
    assert torch.equal(a1, torch.from_numpy(res[f"layer{i}_topk_idx"]).long())
    diffs += int((a0 != a1).any(-1).sum())
    total += a0.shape[0]
  frac = diffs / total
  print(f"bias changes the selected expert set for {diffs}/{total} = {frac:.1%} of (token, MoE layer)")
  assert frac >= 0.30, frac
  res["bias_changed_fraction"] = np.float32(frac)

  # Independent NumPy float64 forward per KIMI_K2_FACTS.md
  wt = {k: v.to(torch.float64).numpy() for k, v in w.items()}
  ref = _np_forward(wt, tokens)
  assert np.allclose(res["yarn_inv_freq"], ref["inv_freq"], rtol=1e-6), (res["yarn_inv_freq"], ref["inv_freq"])
  assert np.isclose(res["softmax_scale"], ref["scale"], rtol=1e-6)
  # transformers forms the angle in float32 (f32 position * f32 inv_freq, then cos/sin): at positions ~1e5 the
  # f32 angle is off the exact one by up to ~1e-3 rad.  Mirror that exactly, and report the f64 distance.
  ang32 = res["rope_far_positions"][:, None].astype(np.float32) * res["yarn_inv_freq"][None, :]
  assert np.allclose(res["cos_far"][:, : rope // 2], np.cos(ang32.astype(np.float64)), atol=1e-6), "far cos"
  assert np.allclose(res["sin_far"][:, : rope // 2], np.sin(ang32.astype(np.float64)), atol=1e-6), "far sin"
  ang64 = res["rope_far_positions"][:, None].astype(np.float64) * ref["inv_freq"][None, :]
  print(
    "far cos/sin: max |f32 transformers - exact f64| =",
    float(np.abs(res["cos_far"][:, : rope // 2] - np.cos(ang64)).max()),
    float(np.abs(res["sin_far"][:, : rope // 2] - np.sin(ang64)).max()),
  )
  assert np.allclose(res["cos_far"][:, rope // 2 :], res["cos_far"][:, : rope // 2])
  assert res["attention_scaling"] == 1.0
  worst = 0.0
  for k, v in ref.items():
    if k in ("inv_freq", "scale"):
      continue
    got = res[k]
    if k.endswith("topk_idx"):
      assert np.array_equal(got, v), k
      continue
    v = v.reshape(got.shape)
    err = float(np.max(np.abs(got - v)) / (np.max(np.abs(v)) + 1e-12))
    worst = max(worst, err)
    assert err < 1e-5, (k, err)
  print(f"numpy-from-FACTS forward matches transformers: worst relative max-error {worst:.2e}")

  np.savez(OUT_DIR / "reference.npz", **res)

  # Report
  print("transformers", transformers.__version__, "torch", torch.__version__)
  lg = res["logits"]
  print(f"logits: mean {lg.mean():.3f} std {lg.std():.3f} min {lg.min():.3f} max {lg.max():.3f}")
  for i in range(L):
    print(
      f"layer{i} max_logits {np.round(res[f'layer{i}_max_logits'], 3)}  "
      f"attn_out std {res[f'layer{i}_attn_out'].std():.3f} mlp_out std {res[f'layer{i}_mlp_out'].std():.3f}"
    )
  print("softmax_scale", float(res["softmax_scale"]), "attention_scaling", float(res["attention_scaling"]))
  print("yarn_inv_freq", res["yarn_inv_freq"])
  for k in sorted(res):
    v = np.asarray(res[k])
    print(f"  {k:32s} {str(v.dtype):8s} {list(v.shape)}")
  total = 0
  for p in sorted(OUT_DIR.iterdir()):
    total += os.path.getsize(p)
    print(f"{p.name:40s} {os.path.getsize(p):>9d} bytes")
  print(f"total {total} bytes")
  assert total < 1_000_000, total


if __name__ == "__main__":
  main()
