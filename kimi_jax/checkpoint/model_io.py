"""Model checkpoints on disk: `DIR/config.json` (the ModelConfig) + `DIR/state/` (Orbax PyTree of the model's
variables: params and router biases). Converted HF checkpoints use this layout; training checkpoints hold the
same variables as `{"params": ..., "rest": ...}`, so either can seed a run or feed `kimi_jax.forward`.

Restoring takes target shardings from abstract shapes (`shardings=`): Orbax then reads, on each host, only the
chunks its devices' shards cover, whatever mesh the checkpoint was written from (converted checkpoints carry no
mesh at all). Without shardings, leaves come back on one device (or as host arrays).
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
PyTree = Any


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


def workdir_state(workdir: str) -> tuple[ModelConfig, str]:
  """(model config, Orbax item dir of the model state) of a training workdir's latest checkpoint."""
  from kimi_jax.checkpoint.manager import TrainCheckpointer

  run_config = os.path.join(workdir, RUN_CONFIG_FILE)
  if not os.path.isfile(run_config):
    raise FileNotFoundError(f"{workdir} is neither a model checkpoint ({CONFIG_FILE} + {STATE_DIR}/) nor a "
                            f"training workdir ({RUN_CONFIG_FILE})")
  with open(run_config) as f:
    cfg = ModelConfig.from_dict(json.load(f)["model"])
  ckpt = TrainCheckpointer(workdir, keep=1)
  step = ckpt.latest_step()
  ckpt.close()
  if step is None:
    raise FileNotFoundError(f"{workdir}: training workdir without checkpoints")
  return cfg, os.path.join(ckpt.directory, str(step), "state")


def restore_state(directory: str, cfg: ModelConfig, shardings: PyTree | None = None) -> dict[str, Any]:
  """The model variables stored in `directory` (a model checkpoint or training workdir), shaped and typed for
  `cfg` (param_dtype casts on read), as a nested dict like `nnx.state(model, nnx.Variable).to_pure_dict()`.

  shardings: None, or a pytree of `jax.sharding.Sharding` matching that dict; each host then reads only its
  shards. The stored architecture must match `cfg`'s.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, STATE_DIR)):
    saved, item_dir, split = load_config(directory), os.path.join(directory, STATE_DIR), False
  else:
    (saved, item_dir), split = workdir_state(directory), True
  diff = {k: (v, cfg.architecture()[k]) for k, v in saved.architecture().items() if cfg.architecture()[k] != v}
  if diff:
    changes = ", ".join(f"{k}: {a!r} (checkpoint) vs {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(f"{directory} holds another architecture than the requested config ({changes})")
  model = nnx.eval_shape(lambda: _model(cfg))
  abstract = nnx.state(model, nnx.Variable).to_pure_dict()
  if shardings is None:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
  else:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  if split:  # training checkpoints store {"params": Params, "rest": everything else (router biases)}
    _, params, _ = nnx.split(model, nnx.Param, ...)
    target = _split_like(target, params.to_pure_dict())
  # Arrays saved with a sharding of another topology (a training run on another mesh) fall back to one device.
  fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    state = ckptr.restore(item_dir, args=ocp.args.StandardRestore(target, fallback_sharding=fallback))
  return _merge(state["params"], state["rest"]) if split else state


def load_model(directory: str, shardings: PyTree | None = None, **runtime: Any):
  """Rebuild the model from a model checkpoint; `runtime` overrides dtype, moe_impl, …. Returns (cfg, model).

  shardings: see `restore_state`.
  """
  cfg = load_config(directory, **runtime)
  return cfg, _build(cfg, restore_state(directory, cfg, shardings))


def load_any(directory: str, shardings: PyTree | None = None, **runtime: Any):
  """A model from a model checkpoint (config.json + state/) or a training workdir (its latest checkpoint)."""
  if os.path.isdir(os.path.join(directory, STATE_DIR)):
    return load_model(directory, shardings, **runtime)
  cfg = workdir_state(directory)[0].replace(**runtime)
  return cfg, _build(cfg, restore_state(directory, cfg, shardings))


def init_state_from(directory: str, cfg: ModelConfig,
                    shardings: tuple[PyTree, PyTree] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Initial (params, rest) for a training run from a converted HF checkpoint, a model checkpoint or another
  run's workdir: pure dicts shaped like `nnx.split(KimiK2(cfg), nnx.Param, ...)[1:]` (`.to_pure_dict()`), in
  cfg.param_dtype. shardings: optional (params_shardings, rest_shardings) pytrees matching them.
  """
  model = nnx.eval_shape(lambda: _model(cfg))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  full = None if shardings is None else _merge(*shardings)
  state = restore_state(directory, cfg, full)
  split = _split_like(state, params.to_pure_dict())
  return split["params"], split["rest"]


def _model(cfg: ModelConfig):
  from kimi_jax.model import KimiK2

  return KimiK2(cfg, rngs=nnx.Rngs(0))


def _build(cfg: ModelConfig, state: dict[str, Any]):
  model = nnx.eval_shape(lambda: _model(cfg))
  nnx.update(model, state)
  return model


def _split_like(tree: dict[str, Any], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """{"params": the leaves of `tree` whose paths are in `params`, "rest": the others}."""
  def go(node, p):
    ours, rest = {}, {}
    for k, v in node.items():
      if isinstance(v, dict):
        a, b = go(v, p.get(k, {}) if isinstance(p, dict) else {})
        if a:
          ours[k] = a
        if b:
          rest[k] = b
      elif isinstance(p, dict) and k in p:
        ours[k] = v
      else:
        rest[k] = v
    return ours, rest

  params_part, rest_part = go(tree, params)
  return {"params": params_part, "rest": rest_part}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
  return out
