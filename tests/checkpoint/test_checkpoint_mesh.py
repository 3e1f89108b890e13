"""Checkpoints restore onto any mesh: saved on 1 device → restored sharded over 8, saved sharded over 8 → restored
on 1, and a converted HF checkpoint (which carries no mesh) restored straight into 8-way shardings.

jax fixes its device count at start-up, so each side runs in its own process (this file, run as a script with
XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

import os
import subprocess
import sys

from helpers.paths import TINY_HF, python_path_env
import numpy as np


def _run(step: str, devices: int, work: str) -> str:
  env = python_path_env()  # this file imports helpers when run as a script
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run([sys.executable, __file__, step, work], capture_output=True, text=True, env=env)
  assert out.returncode == 0, f"{step} on {devices} device(s) failed:\n{out.stderr[-4000:]}"
  return out.stdout


def test_restore_across_meshes(tmp_path):
  work = str(tmp_path)
  assert "ok" in _run("save_on_1", 1, work)
  assert "ok" in _run("restore_on_8_and_save", 8, work)
  assert "ok" in _run("restore_on_1", 1, work)


# The worker side ---------------------------------------------------------------------------------------------------


def _reference():
  from kimi_jax.checkpoint.hf import HFCheckpoint, flatten, load_state

  ckpt = HFCheckpoint(TINY_HF)
  return ckpt.config(), flatten(load_state(ckpt, ckpt.config(), np.float32))


def _check(flat, reference, shardings=None):
  """flat: {path: array}; equal to `reference` and, if given, laid out as `shardings` ({path: Sharding})."""

  assert flat.keys() == reference.keys()
  for path, value in reference.items():
    np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=".".join(path))
  if shardings is not None:
    for path, sharding in shardings.items():
      assert flat[path].sharding == sharding, (path, flat[path].sharding)
      if "x" in sharding.spec:  # really split: each device holds 1/8 along that axis
        axis = list(sharding.spec).index("x")
        assert flat[path].addressable_shards[0].data.shape[axis] * 8 == flat[path].shape[axis], path


def _eight_way(cfg):
  """Shard every leaf's first axis of size divisible by 8 (the stacked expert axis, the vocabulary) 8 ways."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from kimi_jax.checkpoint.hf import abstract_state

  mesh = Mesh(np.array(jax.devices()), ("x",))

  def spec(leaf):
    axes = [None] * len(leaf.shape)
    for i, n in enumerate(leaf.shape):
      if n % 8 == 0 and n >= 8:
        axes[i] = "x"
        break
    return NamedSharding(mesh, PartitionSpec(*axes))

  return jax.tree.map(spec, abstract_state(cfg))


def _main(step: str, work: str) -> None:
  from flax import nnx
  import jax

  from kimi_jax.checkpoint.convert import hf_to_orbax
  from kimi_jax.checkpoint.hf import flatten, unflatten
  from kimi_jax.checkpoint.model_io import init_state_from, load_model, restore_state, save_model

  cfg, reference = _reference()
  single, sharded, converted = (os.path.join(work, n) for n in ("single", "sharded", "converted"))
  if step == "save_on_1":
    assert jax.device_count() == 1
    save_model(single, cfg, jax.device_put(unflatten(reference)))
    hf_to_orbax(str(TINY_HF), converted)
  elif step == "restore_on_8_and_save":
    assert jax.device_count() == 8
    shardings = _eight_way(cfg)
    for source in (single, converted):  # 1 → 8, and a mesh-less converted checkpoint → 8
      _check(flatten(restore_state(source, cfg, shardings)), reference, flatten(shardings))
    _, model = load_model(single, shardings)
    state = nnx.state(model, nnx.Variable).to_pure_dict()
    _check(flatten(state), reference, flatten(shardings))
    save_model(sharded, cfg, state)
  elif step == "restore_on_1":
    assert jax.device_count() == 1
    _check(flatten(restore_state(sharded, cfg)), reference)  # 8 → 1
    params, rest = init_state_from(sharded, cfg)
    _check({**flatten(params), **flatten(rest)}, reference)
  print("ok")


if __name__ == "__main__":
  _main(sys.argv[1], sys.argv[2])
