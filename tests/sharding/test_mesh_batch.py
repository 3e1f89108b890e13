"""Inference takes any batch on any mesh: forward logits and greedy tokens for batches of 1 and 2 on 8 devices equal
the single-device ones (the batch is padded to the 8 batch shards with copies of row 0 and the padding dropped), and
so do sampled tokens (the draws see only the real rows).

jax fixes its device count at start-up, so the 8-device side runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8: this file as a script, which checks the library on two meshes
while the forward and generate CLIs run alongside (2 cores: overlapping the three compiles keeps this fast). The
model is the transformers fixture in float32.
"""

import json
import os
import subprocess
import sys

from flax import nnx
from helpers.paths import TINY_HF, python_path_env
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from kimi_jax import generate as gen
from kimi_jax import sharding
from kimi_jax.checkpoint.hf import HFCheckpoint, load_state
from kimi_jax.checkpoint.model_io import save_model
from kimi_jax.config import tiny
from kimi_jax.forward import forward_logits
from kimi_jax.model_stats import abstract_model

MESHES = ("data=1,fsdp=2,expert=4", "fsdp=8")  # expert-parallel, and plain SPMD; both split the batch 8 ways
NEW_TOKENS = 6
SAMPLED = {"max_new_tokens": NEW_TOKENS, "sampling": gen.Sampling(temperature=1.0), "seed": 3}
# This file as a script (it imports helpers) on 8 fake CPU devices.
EIGHT_DEVICES = {**python_path_env(), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _prompts(batch: int) -> list[list[int]]:
  """The fixture's 7- and 12-token prompts: rows of different lengths, so prompt padding meets batch padding."""
  ref = np.load(TINY_HF / "generate.npz")
  return [p[:n].tolist() for p, n in zip(ref["prompts"][1:], ref["prompt_lengths"][1:])][:batch]


def _tokens(batch: int) -> np.ndarray:
  return np.load(TINY_HF / "reference.npz")["tokens"][:batch]  # [B, 12] int32


def _model():
  ckpt = HFCheckpoint(TINY_HF)
  cfg = ckpt.config(dtype="float32", param_dtype="float32")
  model = abstract_model(cfg)
  nnx.update(model, jax.tree.map(jnp.asarray, load_state(ckpt, cfg)))
  return model


def _references(model) -> dict:
  """{B: (logits [B, 12, V], greedy tokens)} on one device for batches of 1 and 2, stopping on the fixture's EOS (2).

  One run of the batch of 2: on one device rows are independent (test_generate batches prompts against
  transformers' one-at-a-time generate), so its row 0 is the batch of 1.
  """
  logits = np.asarray(forward_logits(model, _tokens(2)))
  tokens = gen.generate(model, _prompts(2), max_new_tokens=NEW_TOKENS, stop_tokens=(2,))
  return {1: (logits[:1], tokens[:1]), 2: (logits, tokens), "sampled": gen.generate(model, _prompts(2), **SAMPLED)}


def test_padding_helpers():
  mesh = AbstractMesh((1, 2, 4, 1), sharding.MESH_AXES)
  assert [sharding.padded_batch(b, mesh) for b in (1, 2, 8, 9)] == [8, 8, 8, 16]
  assert sharding.padded_batch(3, None) == 3
  assert sharding.padded_batch(8, mesh, capacity_factor=1.25) == 8  # nothing to pad: capacity is the run's choice
  with pytest.raises(ValueError, match=r"batch size 2 must be padded to 8 .* moe_capacity_factor=1.25"):
    sharding.padded_batch(2, mesh, capacity_factor=1.25)
  x = np.arange(6).reshape(2, 3)
  for a in (x, jnp.asarray(x)):
    padded = sharding.pad_batch({"a": a}, 8)["a"]
    assert type(padded) is type(a)
    np.testing.assert_array_equal(padded, np.concatenate([x] + [x[:1]] * 6))
    np.testing.assert_array_equal(sharding.unpad_batch(padded, 2), x)
  assert sharding.pad_batch(x, 2) is x
  with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
    sharding.check_batch(2, mesh)  # training still refuses: padding rows would enter the loss


def test_padding_under_a_capacity_factor_is_refused():
  """With moe_capacity_factor set, padding rows could crowd real tokens out of the expert buffers."""
  model = abstract_model(tiny(moe_capacity_factor=2.0))
  mesh = AbstractMesh((1, 2, 4, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError, match="moe_capacity_factor=2.0 padding rows would compete"):
    forward_logits(model, np.zeros((2, 4), np.int32), mesh)
  with pytest.raises(ValueError, match="moe_capacity_factor=2.0 padding rows would compete"):
    gen.generate(model, [[1, 2]], max_new_tokens=2, mesh=mesh)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict:
  """The 8-device results: this file as a script, which also runs the two CLIs alongside (see `_main`)."""
  # The fixture as a model checkpoint whose config carries moe_capacity_factor=0.5, as a training workdir's may:
  # the CLIs must run it dropless on a mesh (with the factor, padding the batch is refused).
  work = tmp_path_factory.mktemp("mesh_batch")
  ckpt = HFCheckpoint(TINY_HF)
  cfg = ckpt.config(dtype="float32", param_dtype="float32")
  save_model(str(work / "ckpt"), cfg.replace(moe_capacity_factor=0.5), load_state(ckpt, cfg))
  out = subprocess.run(
    [sys.executable, __file__, str(work)], capture_output=True, text=True, env=EIGHT_DEVICES, timeout=600, check=False
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", MESHES)
def test_library_matches_one_device(eight_devices, spec):
  """`forward_logits` and `generate` with mesh=, batches of 1 and 2."""
  got = eight_devices[spec]
  assert got["cache_split_like_batch"] and got["params_split_8_ways"], got
  assert got["sampled_equal"], got  # sampling draws for the real rows only: padding changes no draw
  for b in ("1", "2"):
    assert got["logits_shape"][b] == [int(b), 12, 256], got
    assert got["max_logit_diff"][b] < 1e-5, (spec, b, got)
    assert got["tokens_equal"][b], (spec, b, got)


def test_clis_match_one_device(eight_devices):
  """The issue's command, forward on a batch of 2, and generate on one prompt, both with --mesh
  data=1,fsdp=2,expert=4."""
  got = eight_devices["cli"]
  for name in ("forward", "generate"):
    assert got[name]["returncode"] == 0, got[name]["stderr"]
  assert got["forward"]["logits_shape"] == [2, 12, 256] and got["forward"]["max_logit_diff"] < 1e-5, got
  assert got["generate"]["tokens_equal"], got


# The 8-device side ---------------------------------------------------------------------------------------------


def _start_clis(work: str) -> dict[str, subprocess.Popen]:
  """Starts the forward and generate CLIs (8 devices, as this process) on `work`/ckpt; they run alongside."""
  tokens, prompt = os.path.join(work, "t.npy"), os.path.join(work, "p.npy")
  np.save(tokens, _tokens(2))
  np.save(prompt, np.asarray(_prompts(1), np.int32))
  common = ["--checkpoint", os.path.join(work, "ckpt"), "--dtype", "float32", "--mesh", MESHES[0]]
  args = {
    "forward": ["--tokens", tokens, "--out", os.path.join(work, "forward.npy")],
    "generate": [
      "--prompt_tokens",
      prompt,
      "--max_new_tokens",
      str(NEW_TOKENS),
      "--out",
      os.path.join(work, "generate.npy"),
    ],
  }
  return {
    name: subprocess.Popen(
      [sys.executable, "-m", f"kimi_jax.{name}", *common, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for name, a in args.items()
  }


def _cli_results(runs: dict[str, subprocess.Popen], work: str, ref: dict) -> dict:
  out = {}
  for name, run in runs.items():
    _, stderr = run.communicate(timeout=600)
    out[name] = {"returncode": run.returncode, "stderr": stderr[-4000:]}
  if out["forward"]["returncode"] == 0:
    logits = np.load(os.path.join(work, "forward.npy"))
    out["forward"].update(logits_shape=list(logits.shape), max_logit_diff=float(np.max(np.abs(logits - ref[2][0]))))
  if out["generate"]["returncode"] == 0:
    tokens = [[t for t in row if t >= 0] for row in np.load(os.path.join(work, "generate.npy")).tolist()]
    out["generate"].update(tokens=tokens, tokens_equal=tokens == ref[1][1])
  return out


def _main(work: str) -> None:
  assert jax.device_count() == 8
  jax.config.update("jax_default_matmul_precision", "highest")
  runs = _start_clis(work)
  model = _model()
  ref = _references(model)
  results = {}
  for spec in MESHES:
    mesh = sharding.make_mesh(spec)
    sharding.shard_model(model, mesh)
    got = {"max_logit_diff": {}, "logits_shape": {}, "tokens_equal": {}, "tokens": {}}
    for b in (1, 2):
      logits = np.asarray(forward_logits(model, _tokens(b), mesh))
      got["logits_shape"][b] = list(logits.shape)
      got["max_logit_diff"][b] = float(np.max(np.abs(logits - ref[b][0])))
      got["tokens"][b] = gen.generate(model, _prompts(b), max_new_tokens=NEW_TOKENS, stop_tokens=(2,), mesh=mesh)
      got["tokens_equal"][b] = got["tokens"][b] == ref[b][1]
    got["sampled_equal"] = gen.generate(model, _prompts(2), mesh=mesh, **SAMPLED) == ref["sampled"]
    # The prefill `generate` ran (same inputs and shardings, so no new compile): its cache's B is split like the batch.
    tokens, lengths, max_len = gen.pack_prompts(_prompts(1), model.cfg, NEW_TOKENS)
    inputs = jax.device_put(
      sharding.pad_batch((tokens, lengths), 8), (sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1))
    )
    with sharding.use_mesh(mesh):
      _, state = gen.prefill(model, *inputs, max_len=max_len)
    cache = state.cache["moe_layers"]["latent"]  # [L, B, T, Ckv]
    got["cache_split_like_batch"] = cache.sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, sharding.BATCH_AXES)), cache.ndim
    )
    gate = model.moe_layers.mlp.experts.gate[...]  # [L, E, D, F]
    got["params_split_8_ways"] = gate.addressable_shards[0].data.size * 8 == gate.size
    results[spec] = got
  results["cli"] = _cli_results(runs, work, ref)
  print(json.dumps(results))


if __name__ == "__main__":
  _main(sys.argv[1])
