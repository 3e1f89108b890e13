"""Convert between Hugging Face Kimi K2 checkpoints and kimi-jax (Orbax) model checkpoints.

    python -m kimi_jax.convert hf-to-orbax --hf_dir HF_DIR --out_dir OUT [--dtype float32|bfloat16]
    python -m kimi_jax.convert orbax-to-hf --checkpoint OUT --out_dir HF_DIR [--dtype bfloat16|float32]

This version reads BF16/F32 releases tensor by tensor into host memory; FP8/INT4 dequantisation and
streaming writes for the 1 TB releases are not here yet (they raise a clear error).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "kimi-jax model checkpoint directory (orbax-to-hf input).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Stored weight dtype (default: float32 for hf-to-orbax, bfloat16 for orbax-to-hf).")

COMMANDS = ("hf-to-orbax", "orbax-to-hf")


def hf_to_orbax(hf_dir: str, out_dir: str, dtype: str = "float32") -> None:
  from kimi_jax.checkpoint.hf import HFCheckpoint, load_state
  from kimi_jax.checkpoint.model_io import save_model

  ckpt = HFCheckpoint(hf_dir)
  cfg = ckpt.config(param_dtype=dtype)
  save_model(out_dir, cfg, load_state(ckpt, cfg))


def orbax_to_hf(checkpoint: str, out_dir: str, dtype: str = "bfloat16") -> None:
  import ml_dtypes
  import numpy as np
  from flax import nnx

  from kimi_jax.checkpoint.hf import save_state
  from kimi_jax.checkpoint.model_io import load_model

  cfg, model = load_model(checkpoint)
  state = nnx.state(model, nnx.Variable).to_pure_dict()
  save_state(state, cfg, out_dir, dtype=np.float32 if dtype == "float32" else ml_dtypes.bfloat16)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)}")
  start = time.time()
  if argv[1] == "hf-to-orbax":
    if not _HF_DIR.value:
      raise app.UsageError("hf-to-orbax needs --hf_dir")
    hf_to_orbax(_HF_DIR.value, _OUT_DIR.value, _DTYPE.value or "float32")
  else:
    if not _CHECKPOINT.value:
      raise app.UsageError("orbax-to-hf needs --checkpoint")
    orbax_to_hf(_CHECKPOINT.value, _OUT_DIR.value, _DTYPE.value or "bfloat16")
  print(f"{argv[1]}: wrote {_OUT_DIR.value} in {time.time() - start:.1f}s")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
