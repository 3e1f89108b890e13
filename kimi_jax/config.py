"""ModelConfig: every architecture number of Kimi K2 (and DeepSeek-V3-shaped models), validated.

Dimension letters, mesh axes and dtypes: the package conventions in kimi_jax/__init__.py.

Architecture fields mirror the Hugging Face config.json names where one exists. The last group
(`use_yarn`, `dtype`, `param_dtype`, `moe_impl`, `attention_impl`, `remat`, `moe_capacity_factor`,
`moe_seq_chunk`) says how to run the model, not what it is: `architecture()` leaves it out, and HF conversion
ignores it.

Rope scaling is a property of the run: the `rope_*` YaRN fields describe the released weights (and are written
back on export untouched), while `use_yarn` says whether this run applies them (YaRN frequencies and the mscale²
softmax factor). Inference on a released checkpoint applies them, as transformers does; training decides per
stage (`kimi_jax.train_config.model_config`: on only when seq_len exceeds rope_original_max_position_embeddings,
DeepSeek-V3's rule, unless the run config forces it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

DTYPES = ("float32", "bfloat16")  # the dtypes a model may store and compute in
MOE_IMPLS = ("auto", "dense", "ragged", "blocked", "pallas")
ATTENTION_IMPLS = ("auto", "xla", "pallas")
REMAT_POLICIES = ("none", "full", "dots")
_RUNTIME_FIELDS = (
  "use_yarn",
  "dtype",
  "param_dtype",
  "moe_impl",
  "attention_impl",
  "remat",
  "moe_capacity_factor",
  "moe_seq_chunk",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int  # D
  num_hidden_layers: int  # all layers; the first `first_k_dense_replace` are dense
  first_k_dense_replace: int
  intermediate_size: int  # dense-layer MLP hidden
  moe_intermediate_size: int  # Fe, per routed expert
  n_routed_experts: int  # E
  num_experts_per_tok: int  # K
  n_shared_experts: int  # shared expert hidden = n_shared_experts * moe_intermediate_size
  routed_scaling_factor: float
  norm_topk_prob: bool = True
  n_group: int = 1  # group-limited routing (DeepSeek-V3: 8 groups, pick 4); K2 uses 1 / 1
  topk_group: int = 1
  num_attention_heads: int  # H (= kv heads in MLA)
  q_lora_rank: int  # Cq
  kv_lora_rank: int  # C
  qk_nope_head_dim: int  # Dn
  qk_rope_head_dim: int  # Dr
  v_head_dim: int  # Dv
  rope_theta: float
  # YaRN (rope_scaling); factor 1 means plain RoPE.
  rope_factor: float = 1.0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_mscale: float = 1.0
  rope_mscale_all_dim: float = 0.0
  rope_original_max_position_embeddings: int = 4096
  max_position_embeddings: int
  rms_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  bos_token_id: int = 163584
  eos_token_id: int = 163585
  # How to run it (not architecture).
  use_yarn: bool = True  # apply the rope_* YaRN fields (no-op when rope_factor is 1)
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"
  moe_impl: str = "auto"  # see kimi_jax/backend.py
  attention_impl: str = "auto"  # see kimi_jax/backend.py
  remat: str = "none"
  moe_capacity_factor: float | None = None  # expert-parallel receive buffers; None: dropless (worst case)
  moe_seq_chunk: int = 0  # MoE over this many positions at a time (divides S); 0: the whole sequence

  def __post_init__(self):
    positive = (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "intermediate_size",
      "moe_intermediate_size",
      "n_routed_experts",
      "num_experts_per_tok",
      "num_attention_heads",
      "q_lora_rank",
      "kv_lora_rank",
      "qk_nope_head_dim",
      "qk_rope_head_dim",
      "v_head_dim",
      "max_position_embeddings",
      "rope_original_max_position_embeddings",
      "n_group",
      "topk_group",
    )
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    for name in ("first_k_dense_replace", "n_shared_experts"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"ModelConfig.{name} must be a non-negative int, got {value!r}")
    for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range", "rope_factor"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")
    _check(
      self.first_k_dense_replace <= self.num_hidden_layers,
      "first_k_dense_replace",
      f"{self.first_k_dense_replace} exceeds num_hidden_layers={self.num_hidden_layers}",
    )
    _check(
      self.num_experts_per_tok <= self.n_routed_experts,
      "num_experts_per_tok",
      f"{self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}",
    )
    _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
    _check(
      self.n_routed_experts % self.n_group == 0,
      "n_group",
      f"{self.n_group} does not divide n_routed_experts={self.n_routed_experts}",
    )
    _check(self.topk_group <= self.n_group, "topk_group", f"{self.topk_group} exceeds n_group={self.n_group}")
    _check(
      self.n_group == 1 or self.num_experts_per_tok <= self.topk_group * self.n_routed_experts // self.n_group,
      "num_experts_per_tok",
      "more experts per token than the selected groups hold",
    )
    _check(isinstance(self.use_yarn, bool), "use_yarn", f"must be true or false, got {self.use_yarn!r}")
    _check(self.dtype in DTYPES, "dtype", f"{self.dtype!r} not in {DTYPES}")
    _check(self.param_dtype in DTYPES, "param_dtype", f"{self.param_dtype!r} not in {DTYPES}")
    _check(self.moe_impl in MOE_IMPLS, "moe_impl", f"{self.moe_impl!r} not in {MOE_IMPLS}")
    _check(
      self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"{self.attention_impl!r} not in {ATTENTION_IMPLS}"
    )
    _check(self.remat in REMAT_POLICIES, "remat", f"{self.remat!r} not in {REMAT_POLICIES}")
    _check(
      self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
      "moe_capacity_factor",
      f"must be > 0 or None, got {self.moe_capacity_factor!r}",
    )
    _check(
      isinstance(self.moe_seq_chunk, int) and self.moe_seq_chunk >= 0,
      "moe_seq_chunk",
      f"must be an int >= 0, got {self.moe_seq_chunk!r}",
    )

  # Derived sizes ------------------------------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_dense_layers(self) -> int:
    return self.first_k_dense_replace

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace

  @property
  def shared_intermediate_size(self) -> int:
    return self.n_shared_experts * self.moe_intermediate_size

  @property
  def yarn_active(self) -> bool:
    """Whether this run applies YaRN: the weights carry a rope_factor > 1 and `use_yarn` is on."""
    return self.use_yarn and self.rope_factor > 1

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 when YaRN is active (transformers' DeepseekV3)."""
    scale = self.qk_head_dim**-0.5
    if self.yarn_active and self.rope_mscale_all_dim:
      m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
      scale *= m * m
    return scale

  # Conversions --------------------------------------------------------------------------------------------
  def replace(self, **changes: Any) -> ModelConfig:
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def architecture(self) -> dict[str, Any]:
    """The fields that define the weights (everything but how to run it)."""
    return {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
    return cls(**d)

  @classmethod
  def from_hf(cls, hf: dict[str, Any], **runtime: Any) -> ModelConfig:
    """From a Hugging Face config.json dict: a text model's (model_type `kimi_k2` or `deepseek_v3`) or a Kimi
    K2.5 / K2.6 / K2.7 wrapper's (model_type `kimi_k25`), read from its text_config.

    RoPE comes from `rope_scaling` + `rope_theta` (transformers v4, the Kimi releases) or `rope_parameters`
    (transformers v5); anything this model cannot apply as written is refused, naming the field.
    """
    # The wrapper is a release layout like the tensor prefixes, so it is described with them (layout.py).
    from kimi_jax.checkpoint import layout as layouts

    layout = layouts.detect(hf)
    where = layout.text_where("config.json")
    hf = layout.text_config(hf, "config.json")  # refuses unknown model types, the wrapper's included
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
      raise ValueError(f"{where} scoring_func {hf['scoring_func']!r} is not supported (expected sigmoid)")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
      raise ValueError(f"{where} topk_method {hf['topk_method']!r} is not supported (expected noaux_tc)")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{where} hidden_act {hf['hidden_act']!r} is not supported (expected silu)")
    if hf.get("tie_word_embeddings", False):
      raise ValueError(f"{where} tie_word_embeddings=true is not supported (Kimi K2 has an untied lm_head)")
    if hf.get("moe_layer_freq") not in (None, 1):
      raise ValueError(
        f"{where} moe_layer_freq={hf['moe_layer_freq']!r} is not supported: every layer from "
        "first_k_dense_replace on is an MoE layer here (moe_layer_freq 1, as in Kimi K2 and "
        "DeepSeek-V3)"
      )
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
      raise ValueError(
        f"{where} num_key_value_heads={hf['num_key_value_heads']} must equal num_attention_heads={heads} for MLA"
      )
    if hf.get("q_lora_rank") is None:
      raise ValueError(f"{where} q_lora_rank is null; only the low-rank query (K2/V3) layout is supported")
    fields = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_hidden_layers=hf["num_hidden_layers"],
      first_k_dense_replace=hf.get("first_k_dense_replace", 0),
      intermediate_size=hf["intermediate_size"],
      moe_intermediate_size=hf["moe_intermediate_size"],
      n_routed_experts=hf["n_routed_experts"],
      num_experts_per_tok=hf["num_experts_per_tok"],
      n_shared_experts=hf.get("n_shared_experts") or 0,
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
      norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
      n_group=hf.get("n_group") or 1,
      topk_group=hf.get("topk_group") or 1,
      num_attention_heads=heads,
      q_lora_rank=hf["q_lora_rank"],
      kv_lora_rank=hf["kv_lora_rank"],
      qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"],
      v_head_dim=hf["v_head_dim"],
      max_position_embeddings=hf["max_position_embeddings"],
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      bos_token_id=hf.get("bos_token_id", 0),
      eos_token_id=hf.get("eos_token_id", 1),
    )
    fields.update(_rope_from_hf(hf, where))
    return cls(**fields, **runtime)

  def to_hf(self) -> dict[str, Any]:
    """A Hugging Face config.json dict (model_type kimi_k2) that from_hf maps back to this config."""
    hf = dict(
      architectures=["DeepseekV3ForCausalLM"],
      model_type="kimi_k2",
      vocab_size=self.vocab_size,
      hidden_size=self.hidden_size,
      intermediate_size=self.intermediate_size,
      moe_intermediate_size=self.moe_intermediate_size,
      num_hidden_layers=self.num_hidden_layers,
      first_k_dense_replace=self.first_k_dense_replace,
      num_attention_heads=self.num_attention_heads,
      num_key_value_heads=self.num_attention_heads,
      n_shared_experts=self.n_shared_experts,
      n_routed_experts=self.n_routed_experts,
      num_experts_per_tok=self.num_experts_per_tok,
      routed_scaling_factor=self.routed_scaling_factor,
      norm_topk_prob=self.norm_topk_prob,
      n_group=self.n_group,
      topk_group=self.topk_group,
      topk_method="noaux_tc",
      scoring_func="sigmoid",
      q_lora_rank=self.q_lora_rank,
      kv_lora_rank=self.kv_lora_rank,
      qk_nope_head_dim=self.qk_nope_head_dim,
      qk_rope_head_dim=self.qk_rope_head_dim,
      v_head_dim=self.v_head_dim,
      hidden_act="silu",
      rope_theta=self.rope_theta,
      max_position_embeddings=self.max_position_embeddings,
      rms_norm_eps=self.rms_norm_eps,
      initializer_range=self.initializer_range,
      bos_token_id=self.bos_token_id,
      eos_token_id=self.eos_token_id,
      tie_word_embeddings=False,
      num_nextn_predict_layers=0,
      attention_bias=False,
      torch_dtype="bfloat16",
    )
    if self.rope_factor != 1.0:
      hf["rope_scaling"] = dict(
        type="yarn",
        factor=self.rope_factor,
        beta_fast=self.rope_beta_fast,
        beta_slow=self.rope_beta_slow,
        mscale=self.rope_mscale,
        mscale_all_dim=self.rope_mscale_all_dim,
        original_max_position_embeddings=self.rope_original_max_position_embeddings,
      )
    return hf


# What a rope_scaling / rope_parameters object may hold: transformers' RopeParameters keys for yarn and default.
_ROPE_KEYS = (
  "rope_type",
  "type",
  "rope_theta",
  "factor",
  "beta_fast",
  "beta_slow",
  "mscale",
  "mscale_all_dim",
  "original_max_position_embeddings",
  "attention_factor",
  "truncate",
  "partial_rotary_factor",
)


def _rope_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """rope_theta and the rope_* fields of a text config.json: legacy `rope_scaling` with a top-level `rope_theta`
  (transformers v4, the Kimi releases) or transformers v5's `rope_parameters` (rope_theta inside, e.g.
  {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0, "beta_fast": 1.0, ...}). Where both forms are
  present they must agree; no RoPE scaling object means plain RoPE (rope_factor 1)."""
  thetas = {"rope_theta": hf["rope_theta"]} if hf.get("rope_theta") is not None else {}
  scalings = {}
  for key in ("rope_scaling", "rope_parameters"):
    rope = hf.get(key)
    if not rope:
      continue
    if not isinstance(rope, dict):  # a ValueError like every other config.json error
      raise ValueError(f"{where} {key} must be an object, got {rope!r}")  # noqa: TRY004
    nested = sorted(k for k, v in rope.items() if isinstance(v, dict))
    if nested:
      raise ValueError(
        f"{where} {key} holds per-layer-type entries ({', '.join(nested)}); Kimi K2 applies one "
        "RoPE to every layer, so give one flat object (rope_type, rope_theta, factor, ...)"
      )
    unknown = sorted(set(rope) - set(_ROPE_KEYS))
    if unknown:
      raise ValueError(f"{where} {key} has unsupported key(s) {', '.join(unknown)} (known: {', '.join(_ROPE_KEYS)})")
    if rope.get("rope_theta") is not None:
      thetas[f"{key}.rope_theta"] = rope["rope_theta"]
    scalings[key] = _yarn_from_hf(rope, f"{where} {key}", hf, legacy=key == "rope_scaling")
  if not thetas:
    raise ValueError(f"{where} has no rope_theta (neither at the top level nor in rope_parameters)")
  if len({float(v) for v in thetas.values()}) > 1:
    raise ValueError(
      f"{where} gives different RoPE bases ({', '.join(f'{k}={v}' for k, v in thetas.items())}); keep one"
    )
  if len(scalings) == 2 and scalings["rope_scaling"] != scalings["rope_parameters"]:
    raise ValueError(
      f"{where} rope_scaling and rope_parameters describe different RoPE scalings "
      f"({scalings['rope_scaling']} vs {scalings['rope_parameters']}); keep one"
    )
  return {"rope_theta": float(next(iter(thetas.values()))), **next(iter(scalings.values()), {})}


def _yarn_from_hf(rope: dict[str, Any], where: str, hf: dict[str, Any], legacy: bool) -> dict[str, Any]:
  """The rope_* fields of one rope_scaling / rope_parameters object ({} for plain RoPE). `legacy`: rope_scaling,
  where original_max_position_embeddings defaults to DeepSeek-V3's 4096 as it always has here; transformers v5
  writes it into rope_parameters itself, so there it must be given."""
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope.get("type", rope_type) != rope_type:
    raise ValueError(f"{where} says type {rope['type']!r} but rope_type {rope_type!r}; keep one")
  if rope.get("partial_rotary_factor", 1) != 1:
    raise ValueError(
      f"{where}.partial_rotary_factor {rope['partial_rotary_factor']!r} is not supported: RoPE "
      "turns all qk_rope_head_dim dims (partial_rotary_factor 1)"
    )
  if rope_type == "default":
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if extra:
      raise ValueError(
        f"{where}: rope_type 'default' (plain RoPE) with scaling key(s) {', '.join(extra)}; set "
        "rope_type yarn or drop them"
      )
    return {}
  if rope_type != "yarn":
    raise ValueError(f"{where}.rope_type {rope_type!r} is not supported (expected yarn or default)")
  if rope.get("truncate", True) is not True:
    raise ValueError(
      f"{where}.truncate {rope['truncate']!r} is not supported: the YaRN ramp ends are rounded to "
      "whole dims here (truncate true, transformers' default and DeepSeek-V3's)"
    )
  original = rope.get("original_max_position_embeddings")
  if original is None and not legacy:
    raise ValueError(f"{where} has no original_max_position_embeddings (the pretraining context YaRN extends)")
  original = int(original or 4096)
  factor = rope.get("factor")
  factor = float(factor if factor is not None else hf["max_position_embeddings"] / original)  # transformers' rule
  # transformers reads beta_fast / beta_slow with `or` (None and 0 mean the paper's 32 / 1).
  fields = {
    "rope_factor": factor,
    "rope_beta_fast": float(rope.get("beta_fast") or 32),
    "rope_beta_slow": float(rope.get("beta_slow") or 1),
    "rope_mscale": float(1 if rope.get("mscale") is None else rope["mscale"]),
    "rope_mscale_all_dim": float(rope.get("mscale_all_dim") or 0),
    "rope_original_max_position_embeddings": original,
  }
  attention = rope.get("attention_factor")
  if attention is not None:
    derived = yarn_mscale(factor, fields["rope_mscale"]) / yarn_mscale(factor, fields["rope_mscale_all_dim"])
    if not math.isclose(float(attention), derived, rel_tol=1e-6):
      raise ValueError(
        f"{where}.attention_factor {attention!r} is not supported: cos/sin are scaled by "
        f"mscale(factor, mscale) / mscale(factor, mscale_all_dim) = {derived:.7g} here; drop "
        "attention_factor or set mscale / mscale_all_dim instead"
      )
  return fields


def yarn_mscale(factor: float, mscale: float) -> float:
  return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ValueError(f"ModelConfig.{field}: {message}")


# Presets ----------------------------------------------------------------------------------------------------


def kimi_k2(**runtime: Any) -> ModelConfig:
  """moonshotai/Kimi-K2-Instruct (and -Base): 1.03 T total, 32.9 B active parameters."""
  return ModelConfig(
    vocab_size=163840,
    hidden_size=7168,
    num_hidden_layers=61,
    first_k_dense_replace=1,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    n_routed_experts=384,
    num_experts_per_tok=8,
    n_shared_experts=1,
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    n_group=1,
    topk_group=1,
    num_attention_heads=64,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rope_theta=50000.0,
    rope_factor=32.0,
    rope_beta_fast=1.0,
    rope_beta_slow=1.0,
    rope_mscale=1.0,
    rope_mscale_all_dim=1.0,
    rope_original_max_position_embeddings=4096,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    bos_token_id=163584,
    eos_token_id=163585,
    **runtime,
  )


def kimi_k2_0905(**runtime: Any) -> ModelConfig:
  """Kimi-K2-Instruct-0905 and Kimi-K2-Thinking: 256 K context (YaRN factor 64)."""
  return kimi_k2(**runtime).replace(max_position_embeddings=262144, rope_factor=64.0)


def tiny(**runtime: Any) -> ModelConfig:
  """A K2-shaped model small enough to train on a laptop CPU in minutes (byte-level vocab)."""
  return ModelConfig(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    intermediate_size=384,
    moe_intermediate_size=96,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    routed_scaling_factor=2.827,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    rope_theta=50000.0,
    rope_factor=32.0,
    rope_beta_fast=1.0,
    rope_beta_slow=1.0,
    rope_mscale=1.0,
    rope_mscale_all_dim=1.0,
    rope_original_max_position_embeddings=4096,
    max_position_embeddings=131072,
    bos_token_id=256,
    eos_token_id=257,
    **runtime,
  )


PRESETS = {"kimi_k2": kimi_k2, "kimi_k2_0905": kimi_k2_0905, "tiny": tiny}


def preset(name: str, **runtime: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](**runtime)
