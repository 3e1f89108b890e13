"""Run the model on a token array and save the logits.

    python -m kimi_jax.forward --checkpoint DIR --tokens T.npy --out L.npy [--dtype float32] [--moe_impl ragged]
        [--mesh fsdp=2,expert=4]

T.npy: int [B, S]; L.npy: float32 [B, S, V]. DIR is a model checkpoint (`kimi_jax.convert hf-to-orbax`) or a
training workdir (its latest checkpoint). On a mesh any B runs (padded to the mesh's batch shards, see
`sharding.padded_batch`), with the experts dropless, so the logits are the single-device ones.
"""

from __future__ import annotations

import functools

from absl import app, flags
from flax import nnx
import jax
from jax.sharding import Mesh
import numpy as np

from kimi_jax import cli_flags, sharding
from kimi_jax.model import KimiK2, check_tokens

_TOKENS = flags.DEFINE_string("tokens", None, "Input token ids, .npy int [B, S].")
# Shared: --checkpoint, --out (logits, .npy float32 [B, S, V]), --dtype (default: the checkpoint's), --moe_impl, --mesh.
_CHECKPOINT, _OUT, _DTYPE = cli_flags.CHECKPOINT, cli_flags.OUT, cli_flags.DTYPE
_MOE_IMPL, _MESH = cli_flags.MOE_IMPL, cli_flags.MESH


def forward_logits(model: KimiK2, tokens: np.ndarray, mesh: Mesh | None = None) -> jax.Array:
  """tokens: [B, S] int -> logits [B, S, V] float32.

  mesh: run sharded over it, the model's variables already placed there (`sharding.shard_model`). The batch is
  padded to the mesh's batch shards and the padding rows are dropped from the logits (`sharding.padded_batch`).
  """
  graphdef, state = nnx.split(model)
  if mesh is None:
    return _forward(graphdef, state, tokens)
  batch = tokens.shape[0]
  tokens = sharding.pad_batch(np.asarray(tokens), sharding.padded_batch(batch, mesh, model.cfg.moe_capacity_factor))
  with sharding.use_mesh(mesh):
    logits = _forward(graphdef, state, jax.device_put(tokens, sharding.batch_sharding(mesh)))
  return sharding.unpad_batch(logits, batch)


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)[0]


def main(argv):
  del argv
  from kimi_jax.checkpoint.model_io import load_any

  runtime = {k: v for k, v in (("dtype", _DTYPE.value), ("moe_impl", _MOE_IMPL.value)) if v}
  if _DTYPE.value:
    runtime["param_dtype"] = _DTYPE.value
  mesh = sharding.make_mesh(_MESH.value) if _MESH.value else None
  if mesh is not None:
    runtime["moe_capacity_factor"] = None  # dropless: see sharding.padded_batch
  cfg, model = load_any(_CHECKPOINT.value, **runtime)
  tokens = np.load(_TOKENS.value)
  check_tokens(tokens, cfg)
  if mesh is not None:
    sharding.shard_model(model, mesh)
  logits = forward_logits(model, tokens.astype(np.int32), mesh)
  np.save(_OUT.value, np.asarray(logits, np.float32))
  print(f"wrote logits {tuple(logits.shape)} to {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "tokens", "out"])
  app.run(main)
