"""Model checkpoints on disk: `DIR/config.json` (the ModelConfig) + `DIR/state/` (Orbax PyTree of the model's
variables: params and router biases). Converted HF checkpoints use this layout; training checkpoints hold the
same variables as `{"params": ..., "rest": ...}`, so either can seed a run or feed `kimi_jax.forward`.

Restoring takes target shardings from abstract shapes (`shardings=`): Orbax then reads, on each host, only the
chunks its devices' shards cover, whatever mesh the checkpoint was written from (converted checkpoints carry no
mesh at all). Without shardings, leaves come back on one device (or as host arrays).

Directories may be local paths or gs:// URLs: everything goes through etils.epath and Orbax (tensorstore).
"""

from __future__ import annotations

import json
from typing import Any

from flax import nnx
import jax
import orbax.checkpoint as ocp

from kimi_jax.checkpoint.workdir import CONFIG_FILE, RUN_CONFIG_FILE, STATE_DIR, Workdir, as_path, check_bucket
from kimi_jax.config import ModelConfig
from kimi_jax.model_stats import abstract_model

PyTree = Any


def save_config(directory: str, cfg: ModelConfig) -> None:
  path = as_path(directory)
  path.mkdir(parents=True, exist_ok=True)  # a no-op on object storage, which has no directories
  (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))


def load_config(directory: str, **runtime: Any) -> ModelConfig:
  path = as_path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; is this a kimi-jax checkpoint directory?")
  return ModelConfig.from_dict(json.loads(path.read_text())).replace(**runtime)


def save_model(directory: str, cfg: ModelConfig, state: dict[str, Any]) -> None:
  """state: nested dict like `nnx.state(model, nnx.Variable).to_pure_dict()` (numpy or jax arrays)."""
  check_bucket(directory, write=True)
  save_config(directory, cfg)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(as_path(directory) / STATE_DIR, state, force=True)


def is_model_checkpoint(directory: str) -> bool:
  """A model checkpoint (config.json + state/) rather than a training workdir: the one place this is decided."""
  return (as_path(directory) / STATE_DIR).is_dir()


def workdir_state(workdir: str) -> tuple[ModelConfig, str]:
  """(model config, Orbax item dir of the model state) of a training workdir's latest checkpoint."""
  wd = Workdir(workdir)
  if not wd.is_run():
    raise FileNotFoundError(
      f"{workdir} is neither a model checkpoint ({CONFIG_FILE} + {STATE_DIR}/) nor a "
      f"training workdir ({RUN_CONFIG_FILE})"
    )
  cfg, item_dir = wd.latest_model_state()
  return cfg, str(item_dir)


def locate_state(directory: str) -> tuple[ModelConfig, str, bool]:
  """(stored config, Orbax item dir, whether the state is split into {"params", "rest"} as training checkpoints
  store it) of a model checkpoint or a training workdir."""
  check_bucket(directory)
  if is_model_checkpoint(directory):
    return load_config(directory), str(as_path(directory) / STATE_DIR), False
  return *workdir_state(directory), True


def restore_state(directory: str, cfg: ModelConfig, shardings: PyTree | None = None) -> dict[str, Any]:
  """The model variables stored in `directory` (a model checkpoint or training workdir), shaped and typed for
  `cfg` (param_dtype casts on read), as a nested dict like `nnx.state(model, nnx.Variable).to_pure_dict()`.

  shardings: None, or a pytree of `jax.sharding.Sharding` matching that dict; each host then reads only its
  shards. The stored architecture must match `cfg`'s.
  """
  saved, item_dir, split = locate_state(directory)
  diff = {k: (v, cfg.architecture()[k]) for k, v in saved.architecture().items() if cfg.architecture()[k] != v}
  if diff:
    changes = ", ".join(f"{k}: {a!r} (checkpoint) vs {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(f"{directory} holds another architecture than the requested config ({changes})")
  model = abstract_model(cfg)
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
  cfg = locate_state(directory)[0].replace(**runtime)
  return cfg, _build(cfg, restore_state(directory, cfg, shardings))


def init_state_from(
  directory: str, cfg: ModelConfig, shardings: tuple[PyTree, PyTree] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Initial (params, rest) for a training run from a converted HF checkpoint, a model checkpoint or another
  run's workdir: pure dicts shaped like `nnx.split(KimiK2(cfg), nnx.Param, ...)[1:]` (`.to_pure_dict()`), in
  cfg.param_dtype. shardings: optional (params_shardings, rest_shardings) pytrees matching them.
  """
  model = abstract_model(cfg)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  full = None if shardings is None else _merge(*shardings)
  state = restore_state(directory, cfg, full)
  split = _split_like(state, params.to_pure_dict())
  return split["params"], split["rest"]


def _build(cfg: ModelConfig, state: dict[str, Any]):
  model = abstract_model(cfg)
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
