"""The train state: what training updates (params, router biases, optimizer state), described from shapes alone,
laid out on a mesh, created in its shards, and saved or restored as a checkpoint."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, NamedTuple

from flax import nnx
import jax
import ml_collections
import optax

from kimi_jax import sharding
from kimi_jax.config import ModelConfig
from kimi_jax.model import KimiK2
from kimi_jax.model_stats import abstract_model

if TYPE_CHECKING:  # Orbax is imported only when a run writes checkpoints
  from kimi_jax.checkpoint.manager import TrainCheckpointer

# Where `rest` keeps the router biases: one RouterBias [L, E] stacked over the MoE layers (kimi_jax/model.py).
ROUTER_BIAS_PATH = ("moe_layers", "mlp", "router", "bias")


class TrainState(NamedTuple):
  """Every array training updates, as pure dicts: what `init_train_state` makes and the train step takes and
  returns. A pytree; the same type holds the state's shardings (`shardings()`) or ShapeDtypeStructs
  (`abstract_train_state`). Checkpoints store it as items "state" = {"params", "rest"} and "opt_state"."""

  params: dict  # the model's nnx.Param variables: what the optimizer trains
  rest: dict  # every other model variable: the router biases (ROUTER_BIAS_PATH), moved by expert load
  opt_state: optax.OptState  # the optimizer's state for params

  def shardings(self) -> TrainState:
    """The sharding of every leaf (arrays, or ShapeDtypeStructs that carry one)."""
    return jax.tree.map(lambda a: a.sharding, self)


def router_biases(rest: dict) -> jax.Array:
  """The RouterBias [L, E] of `rest` (a model's non-Param variables as a pure dict, L its MoE layers)."""
  return functools.reduce(lambda tree, key: tree[key], ROUTER_BIAS_PATH, rest)


def with_router_biases(rest: dict, bias: jax.Array) -> dict:
  """`rest` with its RouterBias [L, E] replaced by `bias`; the dicts on the path are copied, `rest` is unchanged."""

  def replace(tree: dict, path: tuple[str, ...]) -> Any:
    return bias if not path else {**tree, path[0]: replace(tree[path[0]], path[1:])}

  return replace(rest, ROUTER_BIAS_PATH)


@dataclasses.dataclass(frozen=True)
class ModelShapes:
  """The model split as training splits it, from its shapes alone (nothing is allocated), and where it lives on a
  mesh."""

  graphdef: nnx.GraphDef
  params: nnx.State  # the Params, ShapeDtypeStruct leaves
  rest: nnx.State  # everything else (router biases), ShapeDtypeStruct leaves
  param_shardings: dict  # NamedShardings shaped like params.to_pure_dict()
  rest_shardings: dict  # NamedShardings shaped like rest.to_pure_dict()


def model_shapes(cfg: ModelConfig, mesh) -> ModelShapes:
  """The model's graphdef, abstract params and router state, and their shardings on `mesh`."""
  graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
  return ModelShapes(
    graphdef, params, rest, sharding.state_shardings(params, mesh), sharding.state_shardings(rest, mesh)
  )


def param_shardings(cfg: ModelConfig, mesh) -> dict:
  """The params' NamedShardings on `mesh`, as a pure dict."""
  return model_shapes(cfg, mesh).param_shardings


def abstract_train_state(shapes: ModelShapes, tx: optax.GradientTransformation, mesh) -> TrainState:
  """The train state's ShapeDtypeStructs, each carrying its NamedSharding on `mesh` (nothing is allocated).

  The optimizer state's moments take their parameter's sharding; its counters are replicated.
  """
  with_sharding = lambda tree, sh: jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh
  )
  params = with_sharding(shapes.params.to_pure_dict(), shapes.param_shardings)
  rest = with_sharding(shapes.rest.to_pure_dict(), shapes.rest_shardings)
  opt_state = jax.eval_shape(tx.init, params)
  opt_sh = sharding.like_params(opt_state, params, shapes.param_shardings, mesh)
  return TrainState(params, rest, with_sharding(opt_state, opt_sh))


def init_train_state(c: ml_collections.ConfigDict, cfg: ModelConfig, tx, mesh) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, state), as nnx.split gives them: params, router biases and optimizer state created directly in
  their shards on `mesh` (no host holds the model), from `c.init_from` when set."""
  shapes = model_shapes(cfg, mesh)
  sh = abstract_train_state(shapes, tx, mesh).shardings()

  @functools.partial(jax.jit, out_shardings=(sh.params, sh.rest))
  def create():
    _, params, rest = nnx.split(KimiK2(cfg, rngs=nnx.Rngs(c.seed)), nnx.Param, ...)
    return params.to_pure_dict(), rest.to_pure_dict()

  if c.init_from:  # each host reads only its shards; no random copy is ever made
    from kimi_jax.checkpoint.model_io import init_state_from

    params, rest = init_state_from(c.init_from, cfg, shardings=(sh.params, sh.rest))
  else:
    params, rest = create()
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  return shapes.graphdef, TrainState(params, rest, opt_state)


def save_checkpoint(ckpt: TrainCheckpointer, step: int, state: TrainState, data_state: dict) -> None:
  """Starts an async save of `state` as the items "state" = {"params", "rest"} (the layout
  kimi_jax.checkpoint.model_io reads as a model) and "opt_state", with the data iterator's state."""
  ckpt.save(step, {"params": state.params, "rest": state.rest}, state.opt_state, data_state)


def restore_checkpoint(ckpt: TrainCheckpointer, step: int, like: TrainState) -> tuple[TrainState, dict]:
  """(state, data iterator state) saved by `save_checkpoint` at `step`, in the shapes, dtypes and shardings of
  `like` (arrays or ShapeDtypeStructs)."""
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
  model, opt_state, data_state = ckpt.restore(step, {"params": target.params, "rest": target.rest}, target.opt_state)
  return TrainState(model["params"], model["rest"], opt_state), data_state
