"""Generate the Kimi K2.5 reference fixture: the INT4 fixture's text model (``data/tiny_int4/``) re-laid in the
K2.5 / K2.6 / K2.7 release layout, with small synthetic MoonViT weights, and transformers' float32 logits from
its ``kimi_k25`` model (``Kimi_K25ForConditionalGeneration``, transformers >= 5.24).

    /work/refenv/bin/python tests/reference/make_k25_fixture.py      # from the repo root, CPU, no network, ~10 s

Writes ``data/tiny_k25/``:
* ``config.json``: the multimodal wrapper. ``model_type`` kimi_k25, ``architectures``
  [KimiK25ForConditionalGeneration], top-level ``tie_word_embeddings`` false, ``text_config`` = the INT4 fixture's
  config.json unchanged (model_type kimi_k2, its compressed-tensors ``quantization_config`` inside), a small
  ``vision_config`` (MoonViT shape: patch 14, 1 layer, hidden 16, 2 heads, 2×2 merge) and transformers'
  projector / token-id fields.
* two shards + ``model.safetensors.index.json``: every tensor of the INT4 fixture, bytes unchanged (routed experts
  still ``weight_packed`` / ``weight_scale`` / ``weight_shape``), renamed ``language_model.<name>``, in the same
  shard as before; plus 23 BF16 vision tensors under the release's names (``vision_tower.patch_embed.*``,
  ``vision_tower.encoder.blocks.0.{norm0,norm1,wqkv,wo,mlp.fc0,mlp.fc1}.*``, ``vision_tower.encoder.final_layernorm.*``
  in shard 1; ``mm_projector.{pre_norm,proj.0,proj.2}.*`` in shard 2), random (seeded).
* ``reference.npz``: ``tokens`` (the INT4 fixture's), ``logits`` f32 [2, 12, 128] from Kimi_K25ForConditionalGeneration
  in float32 (eager attention and experts) holding the dequantised text weights and the vision weights, and
  ``dequant/language_model.<name>`` for the INT4 fixture's two spot-check weights.

Checked before writing ``reference.npz``: transformers loads the float copy with no missing, unexpected or mismatched
key (so the vision names and shapes are the ones its kimi_k25 conversion mapping expects); every text tensor it holds
equals the dequantised file value; and the logits equal the INT4 fixture's DeepseekV3 logits (same text model) to
1e-5. Dequantisation is make_quant_fixture.py's, applied to the tensors read back from the written files.
Deterministic (seeded); the directory is asserted < 600 kB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import sys
import tempfile

import numpy as np
from safetensors import safe_open
from safetensors.torch import save_file
import torch
from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_quant_fixture import dequantise_int4, read_release  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC, OUT = HERE / "data" / "tiny_int4", HERE / "data" / "tiny_k25"
PREFIX = "language_model."
SEED = 20250802

VISION_CONFIG = {
  "model_type": "kimi_k25_vision",
  "patch_size": 14,
  "pos_emb_height": 4,
  "pos_emb_width": 4,
  "pos_emb_time": 4,
  "num_attention_heads": 2,
  "num_hidden_layers": 1,
  "hidden_size": 16,
  "intermediate_size": 32,
  "hidden_act": "gelu_pytorch_tanh",
  "merge_kernel_size": [2, 2],
}


def wrapper_config(text_config: dict) -> dict:
  return {
    "architectures": ["KimiK25ForConditionalGeneration"],
    "model_type": "kimi_k25",
    "tie_word_embeddings": False,
    "text_config": text_config,
    "vision_config": VISION_CONFIG,
    "projection_hidden_size": VISION_CONFIG["hidden_size"],
    "projection_layer_norm_eps": 1e-5,
    "image_token_id": 163605,
    "video_token_id": 163840,
    "vision_start_token_id": 163602,
    "vision_end_token_id": 163604,
    "dtype": "bfloat16",
  }


def vision_weights(text_hidden: int, seed: int) -> dict[str, torch.Tensor]:
  """MoonViT + patch-merger projector weights in the release's names (transformers renames them on load)."""
  g = torch.Generator().manual_seed(seed)
  d, f, p = VISION_CONFIG["hidden_size"], VISION_CONFIG["intermediate_size"], VISION_CONFIG["patch_size"]
  merged = d * VISION_CONFIG["merge_kernel_size"][0] * VISION_CONFIG["merge_kernel_size"][1]
  shapes = {
    "vision_tower.patch_embed.proj.weight": (d, 3, p, p),
    "vision_tower.patch_embed.proj.bias": (d,),
    "vision_tower.patch_embed.pos_emb.weight": (VISION_CONFIG["pos_emb_height"], VISION_CONFIG["pos_emb_width"], d),
  }
  block = "vision_tower.encoder.blocks.0."
  for norm in ("norm0", "norm1"):
    shapes.update({f"{block}{norm}.weight": (d,), f"{block}{norm}.bias": (d,)})
  for name, (out_f, in_f) in {"wqkv": (3 * d, d), "wo": (d, d), "mlp.fc0": (f, d), "mlp.fc1": (d, f)}.items():
    shapes.update({f"{block}{name}.weight": (out_f, in_f), f"{block}{name}.bias": (out_f,)})
  shapes.update(
    {
      "vision_tower.encoder.final_layernorm.weight": (d,),
      "vision_tower.encoder.final_layernorm.bias": (d,),
      "mm_projector.pre_norm.weight": (d,),
      "mm_projector.pre_norm.bias": (d,),
      "mm_projector.proj.0.weight": (merged, merged),
      "mm_projector.proj.0.bias": (merged,),
      "mm_projector.proj.2.weight": (text_hidden, merged),
      "mm_projector.proj.2.bias": (text_hidden,),
    }
  )
  return {name: (0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16) for name, shape in shapes.items()}


def write(config: dict, shards: dict[str, dict[str, torch.Tensor]]) -> None:
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  with open(OUT / "config.json", "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  weight_map, total = {}, 0
  for fname, tensors in shards.items():
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in tensors})
    total += sum(t.numel() * t.element_size() for t in tensors.values())
  with open(OUT / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    f.write("\n")


@torch.no_grad()
def k25_logits(config: dict, weights: dict[str, torch.Tensor], tokens: np.ndarray) -> np.ndarray:
  """transformers' float32 Kimi_K25ForConditionalGeneration logits for the float weights `weights` (release names),
  after checking that every tensor loads and the text tensors load exactly."""
  plain = json.loads(json.dumps(config))
  del plain["text_config"]["quantization_config"]
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(plain, f)
    save_file(
      {k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"}
    )
    model, info = Kimi_K25ForConditionalGeneration.from_pretrained(
      tmp,
      config=Kimi_K25Config.from_pretrained(tmp),
      dtype=torch.float32,
      attn_implementation="eager",
      experts_implementation="eager",
      output_loading_info=True,
    )
  for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(k), f"load problem {k}: {info.get(k)}"
  assert not model.config.tie_word_embeddings
  model.eval()
  sd = model.state_dict()
  f = config["text_config"]["moe_intermediate_size"]
  text = {n.removeprefix(PREFIX): t for n, t in weights.items() if n.startswith(PREFIX)}
  for name, t in text.items():
    if name == "lm_head.weight":
      loaded = sd["lm_head.weight"]
    elif ".mlp.experts." in name:
      layer, rest = name.split(".mlp.experts.")
      e, proj = int(rest.split(".")[0]), rest.split(".")[1]
      key = f"{layer.replace('model.', 'model.language_model.', 1)}.mlp.experts."
      fused = sd[key + ("down_proj" if proj == "down_proj" else "gate_up_proj")][e]
      loaded = fused if proj == "down_proj" else (fused[:f] if proj == "gate_proj" else fused[f:])
    else:
      loaded = sd[name.replace("model.", "model.language_model.", 1)]
    assert torch.equal(loaded, t.to(torch.float32)), f"loaded tensor differs: {name}"
  return model(input_ids=torch.from_numpy(tokens).long(), use_cache=False).logits.numpy().astype(np.float32)


def main() -> None:
  torch.manual_seed(SEED)
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  with open(SRC / "config.json") as f:
    text_config = json.load(f)
  with open(SRC / "model.safetensors.index.json") as f:
    src_map = json.load(f)["weight_map"]
  config = wrapper_config(text_config)
  shards: dict[str, dict[str, torch.Tensor]] = {}
  for name, fname in sorted(src_map.items()):
    with safe_open(str(SRC / fname), "pt") as f:
      shards.setdefault(fname, {})[PREFIX + name] = f.get_tensor(name)
  first, last = sorted(shards)
  for name, t in vision_weights(text_config["hidden_size"], SEED).items():
    shards[last if name.startswith("mm_projector.") else first][name] = t
  write(config, shards)

  files = read_release(OUT)
  deq = {}
  for name in files:
    if name.endswith("_packed"):
      base = name.removesuffix("_packed")
      deq[base] = dequantise_int4(files[name], files[base + "_scale"], files[base + "_shape"])
    elif not name.endswith(("_scale", "_shape")):
      deq[name] = files[name].to(torch.float32)
  ref = np.load(SRC / "reference.npz")
  for key in (k for k in ref.files if k.startswith("dequant/")):  # the same dequantised values as the INT4 fixture
    np.testing.assert_array_equal(deq[PREFIX + key.removeprefix("dequant/")].numpy(), ref[key])
  logits = k25_logits(config, deq, ref["tokens"])
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)  # same text model as tiny_int4
  np.savez(
    OUT / "reference.npz",
    tokens=ref["tokens"],
    logits=logits,
    **{"dequant/" + PREFIX + k.removeprefix("dequant/"): ref[k] for k in ref.files if k.startswith("dequant/")},
  )
  size = sum(p.stat().st_size for p in OUT.iterdir())
  vision = sum(1 for n in files if not n.startswith(PREFIX))
  print(
    f"{OUT}: {len(files)} tensors ({vision} vision), max |logits - tiny_int4| "
    f"{np.abs(logits - ref['logits']).max():.2e}, {size:,} bytes"
  )
  assert size < 600_000, size


if __name__ == "__main__":
  main()
