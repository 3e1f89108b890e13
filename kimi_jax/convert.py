"""Convert between Hugging Face Kimi K2 checkpoints and kimi-jax (Orbax) model checkpoints, streaming.

    python -m kimi_jax.convert hf-to-orbax --hf_dir HF_DIR --out_dir OUT [--dtype bfloat16] [--workers 8]
    python -m kimi_jax.convert orbax-to-hf --checkpoint OUT --out_dir HF_DIR [--fp8] [--layout k25] [--workers 8]

hf-to-orbax reads BF16/F32, FP8 (Kimi-K2-Instruct) and INT4 (Kimi-K2-Thinking) releases, and the Kimi K2.5 /
K2.6 / K2.7 multimodal wrapper (text backbone only: the vision tensors are skipped, reported in one line); peak
host memory is a few hundred MB plus ~50 MB per worker, whatever the model size. Rerun the same command to
resume an interrupted conversion. orbax-to-hf accepts a model checkpoint or a training workdir and writes the
Kimi K2 layout, or with --layout k25 the K2.5 one (no vision weights). See docs/converting.md.
"""

from __future__ import annotations

import resource
import sys

from absl import app, flags

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "kimi-jax model checkpoint or training workdir (orbax-to-hf input).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Stored weight dtype (default: float32 for hf-to-orbax, bfloat16 for orbax-to-hf).")
_FP8 = flags.DEFINE_bool("fp8", False, "orbax-to-hf: quantise linear weights to FP8 (128x128 blocks) like the "
                         "Kimi-K2-Instruct release.")
_LAYOUT = flags.DEFINE_enum("layout", "k2", ["k2", "k25"],
                            "orbax-to-hf: release layout to write. k2: Kimi K2 names and config.json. k25: Kimi "
                            "K2.5 / K2.6 / K2.7, the text tensors under language_model. and the multimodal wrapper "
                            "config.json (text_config + the source's vision_config when known); no vision weights "
                            "are written: add the release's vision_tower.* / mm_projector.* shards to use images.")
_WRAPPER_CONFIG = flags.DEFINE_string("wrapper_config", None,
                                      "orbax-to-hf --layout k25: a K2.5 release's config.json whose wrapper fields "
                                      "(vision_config, token ids, ...) to write; default: those hf-to-orbax kept "
                                      "in the checkpoint (hf_wrapper.json).")
_WORKERS = flags.DEFINE_integer("workers", 4, "Threads reading, converting and writing in parallel.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (bytes and GB/s).")

COMMANDS = ("hf-to-orbax", "orbax-to-hf")


def main(argv):
  from kimi_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf

  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)}")
  if argv[1] == "hf-to-orbax":
    if not _HF_DIR.value:
      raise app.UsageError("hf-to-orbax needs --hf_dir")
    if _FP8.value:
      raise app.UsageError("--fp8 applies to orbax-to-hf (hf-to-orbax dequantises FP8 releases by itself)")
    if _LAYOUT.present or _WRAPPER_CONFIG.value:
      raise app.UsageError("--layout and --wrapper_config apply to orbax-to-hf (hf-to-orbax reads the layout "
                           "from config.json)")
    stats = hf_to_orbax(_HF_DIR.value, _OUT_DIR.value, dtype=_DTYPE.value or "float32", workers=_WORKERS.value,
                        progress=_PROGRESS.value)
  else:
    if not _CHECKPOINT.value:
      raise app.UsageError("orbax-to-hf needs --checkpoint")
    stats = orbax_to_hf(_CHECKPOINT.value, _OUT_DIR.value, dtype=_DTYPE.value or "bfloat16", fp8=_FP8.value,
                        layout=_LAYOUT.value, wrapper_config=_WRAPPER_CONFIG.value, workers=_WORKERS.value,
                        progress=_PROGRESS.value)
  if not stats.bytes_written:
    print(f"{argv[1]}: {_OUT_DIR.value} is already complete")
    return
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  rate = stats.bytes_read / max(stats.seconds, 1e-9) / 1e9
  print(f"{argv[1]}: wrote {_OUT_DIR.value}: read {stats.bytes_read / 1e9:.2f} GB, wrote "
        f"{stats.bytes_written / 1e9:.2f} GB in {stats.seconds:.1f} s ({rate:.2f} GB/s read), "
        f"peak RSS {rss:.2f} GiB")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
