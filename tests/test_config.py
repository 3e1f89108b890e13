import json
import os

import pytest

from kimi_jax import config
from kimi_jax.config import ModelConfig
from kimi_jax.tools.plan import count_params

FIXTURE_CONFIG = os.path.join(os.path.dirname(__file__), "reference", "data", "tiny_hf", "config.json")


def test_kimi_k2_parameter_counts_are_exact():
  counts = count_params(config.kimi_k2())
  assert counts["total_params"] == 1_026_408_232_448
  assert counts["active_params"] == 32_861_500_928


def test_kimi_k2_numbers():
  cfg = config.kimi_k2()
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (7168, 61, 384, 8)
  assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * __import__("math").log(32) + 1) ** 2)
  assert cfg.num_dense_layers == 1 and cfg.num_moe_layers == 60
  k0905 = config.kimi_k2_0905()
  assert (k0905.max_position_embeddings, k0905.rope_factor) == (262144, 64.0)


def test_hf_round_trip_and_model_types():
  for cfg in (config.kimi_k2(), config.tiny()):
    assert ModelConfig.from_hf(cfg.to_hf()).architecture() == cfg.architecture()
  with open(FIXTURE_CONFIG) as f:
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
