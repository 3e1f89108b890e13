import json

from helpers.paths import TINY_HF, TINY_K25
import pytest

from kimi_jax import config
from kimi_jax.config import ModelConfig
from kimi_jax.model_stats import count_params


def test_kimi_k2_parameter_counts_are_exact():
  counts = count_params(config.kimi_k2())
  assert counts["total_params"] == 1_026_408_232_448
  assert counts["active_params"] == 32_861_500_928


def test_kimi_k2_numbers():
  cfg = config.kimi_k2()
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (7168, 61, 384, 8)
  assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * __import__("math").log(32) + 1) ** 2)
  assert cfg.num_dense_layers == 1 and cfg.num_moe_layers == 60
  k0905 = config.kimi_k2_0905()
  assert (k0905.max_position_embeddings, k0905.rope_factor) == (262144, 64.0)


def test_hf_round_trip_and_model_types():
  for cfg in (config.kimi_k2(), config.tiny()):
    assert ModelConfig.from_hf(cfg.to_hf()).architecture() == cfg.architecture()
  with open(TINY_HF / "config.json") as f:
    hf = json.load(f)
  assert ModelConfig.from_hf(hf).hidden_size == 64
  assert ModelConfig.from_hf({**hf, "model_type": "deepseek_v3"}).hidden_size == 64
  with pytest.raises(ValueError, match="model_type 'llama'"):
    ModelConfig.from_hf({**hf, "model_type": "llama"})
  with pytest.raises(ValueError, match="scoring_func 'softmax'"):
    ModelConfig.from_hf({**hf, "scoring_func": "softmax"})


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="unknown ModelConfig field.*hiden_size"):
    config.tiny().replace(hiden_size=3)
  with pytest.raises(ValueError, match="unknown ModelConfig field.*bogus"):
    ModelConfig.from_dict({**config.tiny().to_dict(), "bogus": 1})
  with pytest.raises(ValueError, match="num_experts_per_tok"):
    config.tiny().replace(num_experts_per_tok=99)
  with pytest.raises(ValueError, match="hidden_size must be a positive int"):
    config.tiny().replace(hidden_size=0)
  with pytest.raises(ValueError, match="moe_impl"):
    config.tiny().replace(moe_impl="magic")
  with pytest.raises(ValueError, match="qk_rope_head_dim"):
    config.tiny().replace(qk_rope_head_dim=15)


def _fixture_config():
  with open(TINY_HF / "config.json") as f:
    return json.load(f)


def _v5(hf, **rope):
  """`hf` as transformers v5 writes it: rope_parameters (rope_theta inside) instead of rope_scaling + rope_theta."""
  legacy = hf["rope_scaling"]
  params = {
    "rope_type": "yarn",
    "rope_theta": hf["rope_theta"],
    **{k: v for k, v in legacy.items() if k not in ("type", "rope_type")},
    **rope,
  }
  return {**{k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}, "rope_parameters": params}


def test_rope_parameters_give_the_same_config_as_rope_scaling():
  hf = _fixture_config()
  legacy = ModelConfig.from_hf(hf)
  assert legacy.rope_factor == 32.0 and legacy.rope_theta == 50000.0
  assert ModelConfig.from_hf(_v5(hf)) == legacy
  assert ModelConfig.from_hf({**hf, "rope_parameters": _v5(hf)["rope_parameters"]}) == legacy  # both, agreeing
  assert ModelConfig.from_hf(_v5(hf, attention_factor=1.0)) == legacy  # = mscale(32, 1) / mscale(32, 1)
  assert ModelConfig.from_hf(_v5(hf, factor=None)) == legacy  # 131072 / 4096, transformers' rule
  k2 = config.kimi_k2()
  hf_k2 = k2.to_hf()
  assert ModelConfig.from_hf(_v5(hf_k2)) == ModelConfig.from_hf(hf_k2) == k2
  plain = {**_v5(hf), "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}
  no_scaling = {k: v for k, v in hf.items() if k != "rope_scaling"}
  plain_rope = legacy.replace(rope_factor=1.0, rope_beta_fast=32.0, rope_mscale_all_dim=0.0)  # the defaults
  assert ModelConfig.from_hf(plain) == ModelConfig.from_hf(no_scaling) == plain_rope


@pytest.mark.parametrize(
  "rope, message",
  [
    ({"rope_type": "linear"}, r"config\.json rope_parameters\.rope_type 'linear' is not supported"),
    ({"attention_factor": 0.5}, r"config\.json rope_parameters\.attention_factor 0\.5 is not supported"),
    ({"truncate": False}, r"config\.json rope_parameters\.truncate False is not supported"),
    ({"partial_rotary_factor": 0.5}, r"rope_parameters\.partial_rotary_factor 0\.5 is not supported"),
    ({"low_freq_factor": 1.0}, r"rope_parameters has unsupported key\(s\) low_freq_factor"),
    ({"original_max_position_embeddings": None}, r"rope_parameters has no original_max_position_embeddings"),
    ({"rope_theta": None}, r"config\.json has no rope_theta"),
  ],
  ids=[
    "rope_type",
    "attention_factor",
    "truncate",
    "partial_rotary_factor",
    "unknown_key",
    "no_original",
    "no_rope_theta",
  ],
)
def test_rope_parameters_that_cannot_be_mapped_are_refused(rope, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_hf(_v5(_fixture_config(), **rope))


def test_conflicting_or_nested_rope_parameters_are_refused():
  hf = _fixture_config()
  params = _v5(hf)["rope_parameters"]
  with pytest.raises(ValueError, match=r"different RoPE bases \(rope_theta=50000\.0, rope_parameters\.rope_theta=1"):
    ModelConfig.from_hf({**hf, "rope_parameters": {**params, "rope_theta": 10000.0}})
  with pytest.raises(ValueError, match=r"rope_scaling and rope_parameters describe different RoPE scalings"):
    ModelConfig.from_hf({**hf, "rope_parameters": {**params, "factor": 64.0}})
  with pytest.raises(ValueError, match=r"rope_parameters holds per-layer-type entries \(full_attention\)"):
    ModelConfig.from_hf({**_v5(hf), "rope_parameters": {"full_attention": params}})


def test_moe_layer_freq_other_than_one_is_refused():
  hf = _fixture_config()
  assert hf["moe_layer_freq"] == 1 and ModelConfig.from_hf(hf).num_moe_layers == 2
  with pytest.raises(ValueError, match=r"config\.json moe_layer_freq=2 is not supported"):
    ModelConfig.from_hf({**hf, "moe_layer_freq": 2})


def test_k25_wrapper_reads_its_text_config():
  with open(TINY_K25 / "config.json") as f:
    k25 = json.load(f)
  assert k25["model_type"] == "kimi_k25"
  assert ModelConfig.from_hf(k25) == ModelConfig.from_hf({**k25["text_config"], "tie_word_embeddings": False})
  with pytest.raises(ValueError, match=r"config\.json text_config hidden_act 'gelu' is not supported"):
    ModelConfig.from_hf({**k25, "text_config": {**k25["text_config"], "hidden_act": "gelu"}})
