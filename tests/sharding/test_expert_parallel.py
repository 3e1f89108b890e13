"""Expert parallelism (`kimi_jax.expert_parallel`) against the dense reference `routed_experts(impl="dense")`.

The 8-device checks run in a subprocess (`python tests/sharding/test_expert_parallel.py CHECK ARGS`), because the fake
CPU device count must be set before JAX starts. XLA:CPU cannot run ragged-all-to-all, so the ragged strategy
is run on CPU with the collective swapped for the padded emulation (which checks the offsets it computes)
and compiled for a TPU topology (which checks the real op).
"""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

T, D, F, E, K = 64, 16, 8, 16, 4


def _run(check: str, *args: str) -> None:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, check, *args], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]


@pytest.mark.parametrize(
  "mesh", ["expert=8", "data=4,expert=2", pytest.param("data=2,expert=2,tensor=2", marks=pytest.mark.slow)]
)
def test_all_to_all_matches_dense(mesh):
  _run("matches_dense", mesh, "all_to_all")


def test_ragged_plan_matches_dense():
  _run("matches_dense", "data=2,expert=4", "ragged_emulated")


@pytest.mark.slow
def test_pallas_gmm_slots_in():
  """pallas_kernels.gmm (TPU kernel in interpret mode) as the grouped matmul."""
  _run("matches_dense", "data=2,expert=4", "all_to_all", "gmm")


@pytest.mark.parametrize("strategy", ["all_to_all", pytest.param("ragged_emulated", marks=pytest.mark.slow)])
def test_capacity_drops_and_reports(strategy):
  _run("capacity", "data=2,expert=4", strategy)


@pytest.mark.parametrize("matmul", ["ragged_dot", pytest.param("gmm", marks=pytest.mark.slow)])
def test_ragged_compiles_for_tpu(matmul, monkeypatch):
  """fwd+bwd compiled for a v5p 2x2x1 (data=2, expert=2): dropless with ragged_dot, capacity with the Pallas gmm."""
  pytest.importorskip("libtpu")
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # coexist with other processes using libtpu
  import jax
  from jax.experimental import topologies
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from kimi_jax.expert_parallel import expert_parallel_moe
  import pallas_kernels

  devices = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
  mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "expert"))
  tokens, d, f, e, k = 256, 256, 256, 8, 2
  kw = (
    dict(capacity_factor=1.5, matmul=functools.partial(pallas_kernels.gmm, impl="tpu"), check_vma=False)
    if matmul == "gmm"
    else {}
  )

  def loss(x, idx, w, gate, up, down):
    out, dropped = expert_parallel_moe(x, idx, w, gate, up, down, mesh=mesh, strategy="ragged_all_to_all", **kw)
    return jnp.sum(out.astype(jnp.float32) ** 2), dropped

  def aval(shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

  tok = P(("data", "expert"))
  args = (
    aval((tokens, d), jnp.bfloat16, tok),
    aval((tokens, k), jnp.int32, tok),
    aval((tokens, k), jnp.float32, tok),
    aval((e, d, f), jnp.bfloat16, P("expert")),
    aval((e, d, f), jnp.bfloat16, P("expert")),
    aval((e, f, d), jnp.bfloat16, P("expert")),
  )
  # conftest asks for "highest" (f32) matmuls, which TPU's bf16 ragged dot rejects; use the default here.
  with jax.default_matmul_precision("default"):
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4, 5), has_aux=True)).lower(*args)
  assert lowered.as_text().count("ragged_all_to_all") == 4  # dispatch + return, forward and backward
  compiled = lowered.compile()
  assert "ragged-all-to-all" in compiled.as_text()
  if matmul == "gmm":
    assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernels
  assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_errors():
  import jax
  import jax.numpy as jnp

  from kimi_jax.expert_parallel import expert_parallel_moe

  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "expert"))
  x, idx, w = jnp.zeros((T, D)), jnp.zeros((T, K), jnp.int32), jnp.zeros((T, K))
  gate, down = jnp.zeros((E, D, F)), jnp.zeros((E, F, D))
  call = functools.partial(expert_parallel_moe, mesh=mesh, strategy="all_to_all")
  with pytest.raises(ValueError, match="10 experts are not divisible by the expert axis 'expert' of size 4"):
    call(x, idx, w, gate[:10], gate[:10], down[:10])
  with pytest.raises(ValueError, match="60 tokens are not divisible by the 8 token shards"):
    call(x[:60], idx[:60], w[:60], gate, gate, down)
  with pytest.raises(ValueError, match="must include the expert axis"):
    call(x, idx, w, gate, gate, down, token_axes=("data",))
  with pytest.raises(ValueError, match=r"mesh axes \['fsdp'\] are not in the mesh"):
    call(x, idx, w, gate, gate, down, token_axes=("fsdp", "expert"))
  with pytest.raises(ValueError, match="unknown expert-parallel strategy"):
    expert_parallel_moe(x, idx, w, gate, gate, down, mesh=mesh, strategy="alltoall")
  with pytest.raises(ValueError, match="capacity_factor must be positive"):
    call(x, idx, w, gate, gate, down, capacity_factor=0.0)


# ---- checks run on 8 fake devices (subprocess) ----


def _setup(mesh_spec: str, strategy: str):
  """-> (mesh, strategy for expert_parallel_moe, tensor axis or None, (x, idx, weights, gate, up, down))."""
  import jax
  import jax.numpy as jnp

  from kimi_jax import expert_parallel

  jax.config.update("jax_default_matmul_precision", "highest")
  names, sizes = zip(*(item.split("=") for item in mesh_spec.split(",")))
  mesh = jax.make_mesh(tuple(map(int, sizes)), names)  # Explicit axes: exercises the resharding path
  if strategy == "ragged_emulated":
    # Any slice sent between two devices here holds at most a device's pairs: one slot of that size.
    slot = T // (mesh.size // mesh.shape.get("tensor", 1)) * K
    jax.lax.ragged_all_to_all = functools.partial(expert_parallel._padded_ragged_all_to_all, slot=slot)
    strategy = "ragged_all_to_all"
  rng = np.random.default_rng(0)
  idx = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
  # Skew the routing towards low experts so that some devices get far more than their share.
  idx = np.where(rng.uniform(size=(T, K)) < 0.5, idx // 4, idx)
  x, weights = rng.normal(size=(T, D)), rng.uniform(size=(T, K))
  gate, up, down = (0.3 * rng.normal(size=shape) for shape in ((E, D, F), (E, D, F), (E, F, D)))
  inputs = tuple(jnp.asarray(a, jnp.int32 if a is idx else jnp.float32) for a in (x, idx, weights, gate, up, down))
  tensor = "tensor" if "tensor" in names else None
  return mesh, strategy, tensor, inputs


def _dense_value_and_grads(inputs, mask=None):
  import jax
  import jax.numpy as jnp

  from kimi_jax.layers.experts import routed_experts

  x, idx, weights, gate, up, down = inputs
  cotangent = jnp.cos(jnp.arange(T * D, dtype=jnp.float32)).reshape(T, D)

  def loss(x, weights, gate, up, down):
    kept = weights if mask is None else jnp.where(mask, weights, 0.0)
    out, _ = routed_experts(x, idx, kept, gate, up, down, impl="dense")
    return jnp.sum(out * cotangent), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, weights, gate, up, down)


def _parallel_value_and_grads(inputs, **kw):
  import jax
  import jax.numpy as jnp

  from kimi_jax.expert_parallel import expert_parallel_moe

  x, idx, weights, gate, up, down = inputs
  cotangent = jnp.cos(jnp.arange(T * D, dtype=jnp.float32)).reshape(T, D)

  def loss(x, weights, gate, up, down):
    out, dropped = expert_parallel_moe(x, idx, weights, gate, up, down, **kw)
    return jnp.sum(out * cotangent), (out, dropped)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, weights, gate, up, down)


def _assert_close(expected, actual):
  (_, want), want_grads = expected
  (_, (got, _)), got_grads = actual
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  for name, g, w in zip(("x", "weights", "gate", "up", "down"), got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=name)


def check_matches_dense(mesh_spec: str, strategy: str, matmul: str = "ragged_dot") -> None:
  mesh, strategy, tensor, inputs = _setup(mesh_spec, strategy)
  kw = {}
  if matmul == "gmm":  # the Pallas TPU kernel, interpreted
    import pallas_kernels

    kw = dict(matmul=functools.partial(pallas_kernels.gmm, impl="tpu", interpret=True), check_vma=False)
  result = _parallel_value_and_grads(inputs, mesh=mesh, strategy=strategy, tensor_axis=tensor, **kw)
  _assert_close(_dense_value_and_grads(inputs), result)
  assert int(result[0][1][1]) == 0


def check_capacity(mesh_spec: str, strategy: str) -> None:
  import math

  mesh, strategy, _, inputs = _setup(mesh_spec, strategy)
  factor, n = 0.75, mesh.shape["expert"]
  pairs = T // mesh.size * K
  per_source = strategy == "all_to_all"
  capacity = math.ceil(factor * pairs / n) if per_source else math.ceil(factor * pairs)
  mask = _kept_pairs(np.asarray(inputs[1]), mesh.size // n, n, capacity, per_source)
  assert 0 < (~mask).sum() < mask.size
  result = _parallel_value_and_grads(inputs, mesh=mesh, strategy=strategy, capacity_factor=factor)
  _assert_close(_dense_value_and_grads(inputs, mask), result)
  assert int(result[0][1][1]) == (~mask).sum()


def _kept_pairs(idx: np.ndarray, groups: int, n: int, capacity: int, per_source: bool) -> np.ndarray:
  """The capacity rule restated in NumPy: idx [T, K] -> kept [T, K] bool.

  Token shard g·n + s is source s of expert-axis group g. A block (one (source, destination) pair, or all of
  a destination's cells) keeps min(count, level) pairs per (source, expert) cell, level being the largest
  that fits in `capacity`; each cell keeps its earliest pairs.
  """
  local = E // n
  chunks = idx.reshape(groups, n, -1)  # [group, source, pairs in order]
  kept = np.zeros(chunks.shape, bool)
  for g in range(groups):
    counts = np.stack([np.bincount(chunks[g, s], minlength=E) for s in range(n)]).reshape(n, n, local)
    allowed = counts.copy()
    for dest in range(n):
      for cells in [(s,) for s in range(n)] if per_source else [(slice(None),)]:
        block = counts[(*cells, dest)]
        level = max(lv for lv in range(capacity + 1) if np.minimum(block, lv).sum() <= capacity)
        allowed[(*cells, dest)] = np.minimum(block, level)
    allowed = allowed.reshape(n, E)
    for s in range(n):
      seen = np.zeros(E, int)
      for p, expert in enumerate(chunks[g, s]):
        kept[g, s, p] = seen[expert] < allowed[s, expert]
        seen[expert] += 1
  return kept.reshape(idx.shape)


if __name__ == "__main__":
  globals()["check_" + sys.argv[1]](*sys.argv[2:])
