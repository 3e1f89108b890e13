"""Device mesh and logical-axis sharding rules.

Mesh axes: `data` (pure data parallel; the outer, DCN axis across slices), `fsdp` (data parallel with
parameters sharded over it), `expert` (routed experts split over it; data parallel for everything else), and
`tensor` (heads and MLP hidden units split over it). A mesh is written as a spec string,
`"data=2,fsdp=4,expert=8,tensor=1"`; omitted axes have size 1 and `-1` takes the remaining devices.

The model names axes logically ("embed", "heads", "experts", …, see `PARAM_RULES`); this file alone maps them
to mesh axes, so changing the parallelism plan means changing rules here, not model code. Inside the model,
`constrain(x, names)` pins activations, and is a no-op when no mesh is active (single device, tests).

Batches: training requires the batch to split evenly over the batch shards (`check_batch`); inference takes any
batch and pads it with copies of row 0 (`padded_batch`, `pad_batch`, `unpad_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # every axis but tensor splits the batch

# Logical parameter/activation axis -> mesh axis (None: replicated).
PARAM_RULES: dict[str, str | tuple[str, ...] | None] = {
  "layers": None,
  "vocab": "tensor",
  "embed": ("fsdp", "expert"),  # FSDP over the expert axis too (it is data parallel outside the MoE)
  "q_lora": "fsdp",  # q_b/kv_b [L, rank, H·D]: without it they (1.6 B params in K2) sit whole on every chip
  "kv_lora": "fsdp",
  "heads": "tensor",
  "mlp": "tensor",
  "experts": "expert",
  "expert_mlp": "tensor",
  "batch": BATCH_AXES,
  "seq": None,
  "act_embed": None,  # activations keep D whole; the tensor axis splits heads / hidden units instead
}

_ACTIVE: list[tuple[Mesh, dict]] = []


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
  """ "fsdp=2,expert=4" -> {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}; checks the product."""
  sizes = {axis: 1 for axis in MESH_AXES}
  fill = None
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in sizes:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
    try:
      size = int(value)
    except ValueError:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} needs an integer size, got {value!r}") from None
    if size == -1:
      if fill is not None:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1")
      fill = name
    elif size < 1:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}")
    else:
      sizes[name] = size
  fixed = math.prod(sizes.values())
  if fill is not None:
    if num_devices % fixed:
      raise ValueError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by {fixed}")
    sizes[fill] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh spec {spec!r} has {math.prod(sizes.values())} devices but {num_devices} are available")
  return sizes


def make_mesh(spec: str = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES. An empty spec puts every device on fsdp."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = parse_mesh_spec(spec or "fsdp=-1", len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: XLA propagates shardings from the annotated params, inputs and `constrain` points.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None], rules: dict | None = None) -> P:
  """Logical names -> PartitionSpec. A mesh axis already taken by an earlier dim is skipped, so expert
  weights [L, E, D, F] give E the expert axis and D only fsdp, while dense weights' D gets both."""
  rules = PARAM_RULES if rules is None else rules
  out, used = [], set()
  for name in names:
    if name is not None and name not in rules:
      raise ValueError(f"no sharding rule for logical axis {name!r}")
    axes = rules[name] if name is not None else None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _checked_spec(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> P:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    if dim % size:
      raise ValueError(f"{path}: dimension {dim} of shape {shape} is not divisible by mesh axes {axes} (size {size})")
  return spec


def state_shardings(abstract_state: Any, mesh: Mesh, rules: dict | None = None) -> Any:
  """NamedShardings for an `nnx.State` of annotated Variables (params, router biases), as a pure dict."""
  from flax import nnx

  def one(path, variable):
    shape = variable.value.shape
    names = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
    spec = _checked_spec(jax.tree_util.keystr(path), shape, logical_to_spec(names, rules), mesh)
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.State(shardings).to_pure_dict() if isinstance(shardings, nnx.State) else shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """[B, S, ...] arrays: batch over every data-like axis."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
  """How many ways `mesh` splits a batch: the product of the BATCH_AXES sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _describe_batch_axes(mesh: Mesh) -> str:
  return ", ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh) -> None:
  """Training: the global batch must split evenly (padding rows would enter the loss and the router statistics).
  Inference pads instead: `padded_batch` / `pad_batch`."""
  shards = batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(
      f"batch size {batch_size} is not divisible by the {shards} batch shards of the mesh "
      f"({_describe_batch_axes(mesh)})"
    )


def padded_batch(batch_size: int, mesh: Mesh | None, capacity_factor: float | None = None) -> int:
  """The inference batch size B' ≥ B that `mesh` splits evenly: B rounded up to a multiple of its batch shards
  (B itself without a mesh). `pad_batch` fills rows B..B'-1 with copies of row 0; `unpad_batch` drops them.

  Padding rows cannot change the real rows' results: every computation of the model is per row (attention) or per
  token (norms, MLPs, routing), except the expert-parallel exchange, whose receive buffers all rows share. Dropless
  (capacity_factor None) those buffers hold every pair; with a capacity factor, padding pairs (copies of row 0 pick
  row 0's experts, the worst case) could crowd real pairs out of a full buffer, so that case is refused:
  `capacity_factor` is the model's `moe_capacity_factor`.
  """
  if mesh is None:
    return batch_size
  shards = batch_shards(mesh)
  size = -(-batch_size // shards) * shards
  if size != batch_size and capacity_factor is not None:
    raise ValueError(
      f"batch size {batch_size} must be padded to {size} rows for the {shards} batch shards of the "
      f"mesh ({_describe_batch_axes(mesh)}), but with moe_capacity_factor={capacity_factor} padding "
      "rows would compete with real tokens for expert capacity: run dropless (load the model with "
      f"moe_capacity_factor=None) or give a batch divisible by {shards}"
    )
  return size


def pad_batch(tree: Any, size: int) -> Any:
  """Pads the leading (batch) axis of every array in `tree` to `size` rows with copies of row 0 (numpy arrays stay
  numpy; jax arrays, also inside jit, stay jax). Copies of a real row keep padding rows ordinary: valid tokens, a
  prompt length ≥ 1 (an empty row would attend to nothing), and while decoding they follow row 0 exactly."""

  def one(a):
    extra = size - a.shape[0]
    if extra < 0:
      raise ValueError(f"cannot pad a batch of {a.shape[0]} rows to {size}")
    if not extra:
      return a
    xp = np if isinstance(a, np.ndarray) else jnp
    return xp.concatenate([a, xp.repeat(a[:1], extra, axis=0)])

  return jax.tree.map(one, tree)


def unpad_batch(tree: Any, batch_size: int) -> Any:
  """Drops the padding rows that `pad_batch` added: the first `batch_size` rows of every array in `tree`."""
  return jax.tree.map(lambda a: a[:batch_size], tree)


def shard_model(model: Any, mesh: Mesh, rules: dict | None = None) -> Any:
  """Places an nnx model's variables on `mesh` by their logical annotations (`state_shardings`), in place; returns
  the model. For inference; training builds its state sharded from the start (`kimi_jax.train`)."""
  from flax import nnx

  state = nnx.state(model)
  nnx.update(model, jax.device_put(state.to_pure_dict(), state_shardings(state, mesh, rules)))
  return model


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict | None = None) -> Iterator[Mesh]:
  """Make `mesh` current for `constrain` and for jax (jax.set_mesh)."""
  _ACTIVE.append((mesh, PARAM_RULES if rules is None else rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE.pop()


def active_mesh() -> Mesh | None:
  return _ACTIVE[-1][0] if _ACTIVE else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pin activation `x` to the logical axes `names` under the active mesh; identity without one."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer state: a leaf whose path ends with a parameter's path (and has its shape)
  takes that parameter's sharding (moments, momentum); everything else (counters) is replicated.

  Needed because optimizer states are built from zeros, which carry no sharding for XLA to propagate.
  """

  def names(path) -> tuple[str, ...]:
    keys = []
    for key in reversed(path):
      if not isinstance(key, jax.tree_util.DictKey):
        break
      keys.append(key.key)
    return tuple(reversed(keys))

  by_path = {
    names(p): (leaf.shape, s)
    for (p, leaf), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))
  }
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = names(path)
    for start in range(len(keys)):
      shape, s = by_path.get(keys[start:], (None, None))
      if shape == leaf.shape:
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)
