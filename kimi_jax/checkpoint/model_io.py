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
RUN_CONFIG_FILE = "run_config.json"  # written by kimi_jax.train in its workdir


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


def load_any(directory: str, **runtime: Any):
  """A model from a model checkpoint (config.json + state/) or a training workdir (its latest checkpoint)."""
  from kimi_jax.checkpoint.manager import TrainCheckpointer
  from kimi_jax.model import KimiK2

  if os.path.isdir(os.path.join(directory, STATE_DIR)):
    return load_model(directory, **runtime)
  run_config = os.path.join(directory, RUN_CONFIG_FILE)
  if not os.path.isfile(run_config):
    raise FileNotFoundError(f"{directory} is neither a model checkpoint (config.json + {STATE_DIR}/) nor a "
                            f"training workdir ({RUN_CONFIG_FILE})")
  with open(run_config) as f:
    cfg = ModelConfig.from_dict(json.load(f)["model"]).replace(**runtime)
  ckpt = TrainCheckpointer(directory, keep=1)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: training workdir without checkpoints")
  model = nnx.eval_shape(lambda: KimiK2(cfg, rngs=nnx.Rngs(0)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          {"params": params.to_pure_dict(), "rest": rest.to_pure_dict()})
  state = ckpt.restore_state(step, abstract)
  ckpt.close()
  nnx.update(model, state["params"])
  nnx.update(model, state["rest"])
  return cfg, model
