"""Run the model on a token array and save the logits.

    python -m kimi_jax.forward --checkpoint DIR --tokens T.npy --out L.npy [--dtype float32] [--moe_impl ragged]
        [--mesh fsdp=2,expert=4]

T.npy: int [B, S]; L.npy: float32 [B, S, V]. DIR is a model checkpoint (`kimi_jax.convert hf-to-orbax`) or a
training workdir (its latest checkpoint).
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from kimi_jax.config import MOE_IMPLS

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model checkpoint or training workdir.", required=True)
_TOKENS = flags.DEFINE_string("tokens", None, "Input token ids, .npy int [B, S].", required=True)
_OUT = flags.DEFINE_string("out", None, "Output logits, .npy float32 [B, S, V].", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the checkpoint's).")
_MOE_IMPL = flags.DEFINE_enum("moe_impl", None, list(MOE_IMPLS), "Expert compute implementation.")
_MESH = flags.DEFINE_string("mesh", "", "Device mesh, e.g. fsdp=2,expert=4 (kimi_jax/sharding.py); '': one device.")


def main(argv):
  del argv
  from flax import nnx

  from kimi_jax.checkpoint.model_io import load_any
  from kimi_jax.model import check_tokens

  runtime = {k: v for k, v in (("dtype", _DTYPE.value), ("moe_impl", _MOE_IMPL.value)) if v}
  if _DTYPE.value:
    runtime["param_dtype"] = _DTYPE.value
  cfg, model = load_any(_CHECKPOINT.value, **runtime)
  tokens = np.load(_TOKENS.value)
  check_tokens(tokens, cfg)
  tokens = tokens.astype(np.int32)
  if _MESH.value:
    import jax

    from kimi_jax import sharding

    mesh = sharding.make_mesh(_MESH.value)
    sharding.check_batch(tokens.shape[0], mesh)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state.to_pure_dict(), sharding.state_shardings(state, mesh))
    with sharding.use_mesh(mesh):
      logits, _ = jax.jit(lambda s, t: nnx.merge(graphdef, nnx.State(s))(t))(
          state, jax.device_put(tokens, sharding.batch_sharding(mesh)))
  else:
    logits, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
  np.save(_OUT.value, np.asarray(logits, np.float32))
  print(f"wrote logits {tuple(logits.shape)} to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
