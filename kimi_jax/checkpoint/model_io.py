"""Model checkpoints on disk: `DIR/config.json` (the ModelConfig) + `DIR/state/` (Orbax PyTree of the model's
variables: params and router biases). Converted HF checkpoints use this layout; training checkpoints hold the
same `state` item, so either can seed a run or feed `kimi_jax.forward`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from kimi_jax.config import ModelConfig

CONFIG_FILE = "config.json"
STATE_DIR = "state"


def save_config(directory: str, cfg: ModelConfig) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2)


def load_config(directory: str, **runtime: Any) -> ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; is this a kimi-jax checkpoint directory?")
  with open(path) as f:
    return ModelConfig.from_dict(json.load(f)).replace(**runtime)


def save_model(directory: str, cfg: ModelConfig, state: dict[str, Any]) -> None:
  """state: nested dict like `nnx.state(model, nnx.Variable).to_pure_dict()` (numpy or jax arrays)."""
  directory = os.path.abspath(directory)
  save_config(directory, cfg)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, STATE_DIR), state, force=True)


def load_model(directory: str, **runtime: Any):
  """Rebuild the model from `directory`; `runtime` overrides dtype, moe_impl, …. Returns (cfg, model)."""
  from kimi_jax.model import KimiK2

  directory = os.path.abspath(directory)
  cfg = load_config(directory, **runtime)
  model = nnx.eval_shape(lambda: KimiK2(cfg, rngs=nnx.Rngs(0)))
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        nnx.state(model, nnx.Variable).to_pure_dict())
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(directory, STATE_DIR), target)
  nnx.update(model, state)
  return cfg, model
