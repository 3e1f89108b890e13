"""Convert between Hugging Face Kimi K2 checkpoints and kimi-jax (Orbax) model checkpoints, streaming.

    python -m kimi_jax.convert hf-to-orbax --hf_dir HF_DIR --out_dir OUT [--dtype bfloat16] [--workers 8]
    python -m kimi_jax.convert orbax-to-hf --checkpoint OUT --out_dir HF_DIR [--fp8] [--layout k25] [--workers 8]

--workers defaults to two threads per core the process may run on (at least 4). hf-to-orbax keeps its compiled
host decode programs in JAX's persistent compilation cache (--compilation_cache, default
~/.cache/kimi_jax/jax_cache; --compilation_cache= turns it off), so a repeat conversion skips the compiles.

hf-to-orbax reads BF16/F32, FP8 (Kimi-K2-Instruct) and INT4 (Kimi-K2-Thinking) releases, and the Kimi K2.5 /
K2.6 / K2.7 multimodal wrapper (text backbone only: the vision tensors are skipped, reported in one line); peak
host memory is a few hundred MB plus ~50 MB per worker, whatever the model size. Rerun the same command to
resume an interrupted conversion. hf-to-orbax also runs as N processes sharing --out_dir (one host or many),
each converting a disjoint share: --process_index/--process_count, or the environment that `python -m
launch.local` and the other launchers set (kimi_jax/distributed.py); process 0 finishes the checkpoint.
orbax-to-hf accepts a model checkpoint or a training workdir and writes the Kimi K2 layout, or with --layout k25
the K2.5 one (no vision weights). See docs/converting.md.
"""

from __future__ import annotations

import os
import resource
import sys

from absl import app, flags

from kimi_jax import cli_flags

_HF_DIR = flags.DEFINE_string(
  "hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors), local or gs://."
)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory.")
# Shared: --checkpoint (orbax-to-hf input) and --dtype (stored weights; default float32 for hf-to-orbax, bfloat16
# for orbax-to-hf).
_CHECKPOINT, _DTYPE = cli_flags.CHECKPOINT, cli_flags.DTYPE
_FP8 = flags.DEFINE_bool(
  "fp8", False, "orbax-to-hf: quantise linear weights to FP8 (128x128 blocks) like the Kimi-K2-Instruct release."
)
_LAYOUT = flags.DEFINE_enum(
  "layout",
  "k2",
  ["k2", "k25"],
  "orbax-to-hf: release layout to write. k2: Kimi K2 names and config.json. k25: Kimi "
  "K2.5 / K2.6 / K2.7, the text tensors under language_model. and the multimodal wrapper "
  "config.json (text_config + the source's vision_config when known); no vision weights "
  "are written: add the release's vision_tower.* / mm_projector.* shards to use images.",
)
_WRAPPER_CONFIG = flags.DEFINE_string(
  "wrapper_config",
  None,
  "orbax-to-hf --layout k25: a K2.5 release's config.json whose wrapper fields "
  "(vision_config, token ids, ...) to write; default: those hf-to-orbax kept "
  "in the checkpoint (hf_wrapper.json).",
)
_WORKERS = flags.DEFINE_integer(
  "workers",
  0,
  "Threads reading, converting and writing in parallel; 0: two per core this process may run on "
  "(os.sched_getaffinity), at least 4.",
)
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kimi_jax", "jax_cache"),
  "JAX's persistent compilation cache (a directory): a repeat conversion then looks its host decode programs up "
  "(~20 ms each) instead of compiling them (~0.15 s each, two per piece shape). '' for none; JAX_COMPILATION_CACHE_DIR "
  "or jax.config's jax_compilation_cache_dir, when set, wins.",
)
_PROCESS_INDEX = flags.DEFINE_integer(
  "process_index",
  None,
  "hf-to-orbax with several processes: this one's index (0 finalises). Default: "
  "from the launch environment (KIMI_PROCESS_ID, or jax.distributed), else 0.",
)
_PROCESS_COUNT = flags.DEFINE_integer(
  "process_count",
  None,
  "hf-to-orbax: how many processes share the conversion. Default: from the "
  "launch environment (KIMI_NUM_PROCESSES, or jax.distributed), else 1.",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (bytes and GB/s).")

COMMANDS = ("hf-to-orbax", "orbax-to-hf")


def processes() -> tuple[int, int]:
  """(process_index, process_count) of this hf-to-orbax process: the flags, else the launch environment."""
  if (_PROCESS_INDEX.value is None) != (_PROCESS_COUNT.value is None):
    raise app.UsageError("give both --process_index and --process_count, or neither")
  if _PROCESS_COUNT.value is not None:
    return _PROCESS_INDEX.value, _PROCESS_COUNT.value
  from kimi_jax import distributed

  kwargs = distributed.plan(os.environ)
  if kwargs is None:
    return 0, 1
  if "process_id" in kwargs:  # explicit (launch.local and friends): no need to start the coordination service
    return kwargs["process_id"], kwargs["num_processes"]
  # A TPU pod, SLURM or MPI job: only JAX knows our index. Join, ask, and leave again at once: the shares are
  # coordinated through files, and a process that stayed would block at exit until the slowest one finished.
  import jax

  distributed.initialize()
  index, count = jax.process_index(), jax.process_count()
  jax.distributed.shutdown()
  return index, count


def use_compilation_cache(directory: str) -> None:
  """Point JAX's persistent compilation cache at `directory` ('' : leave it off), caching every compile however
  quick (the decode programs take ~0.15 s; JAX caches only those over 1 s by default), unless a cache directory is
  already configured (environment or jax.config), which is left as it is."""
  import jax

  if not directory or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv):
  from kimi_jax.checkpoint.convert import default_workers, hf_to_orbax, orbax_to_hf

  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)}")
  workers = _WORKERS.value or default_workers()
  if argv[1] == "hf-to-orbax":
    if not _HF_DIR.value:
      raise app.UsageError("hf-to-orbax needs --hf_dir")
    if _FP8.value:
      raise app.UsageError("--fp8 applies to orbax-to-hf (hf-to-orbax dequantises FP8 releases by itself)")
    if _LAYOUT.present or _WRAPPER_CONFIG.value:
      raise app.UsageError(
        "--layout and --wrapper_config apply to orbax-to-hf (hf-to-orbax reads the layout from config.json)"
      )
    index, count = processes()
    if not 0 <= index < count:
      raise app.UsageError(f"--process_index {index} is not in [0, --process_count={count})")
    use_compilation_cache(_COMPILATION_CACHE.value)
    stats = hf_to_orbax(
      _HF_DIR.value,
      _OUT_DIR.value,
      dtype=_DTYPE.value or "float32",
      workers=workers,
      progress=_PROGRESS.value,
      process_index=index,
      process_count=count,
    )
    if count > 1:
      what = "finished the checkpoint" if index == 0 else "converted its share; process 0 finishes the checkpoint"
      print(
        f"hf-to-orbax: process {index} of {count} {what}: read {stats.bytes_read / 1e9:.2f} GB, wrote "
        f"{stats.bytes_written / 1e9:.2f} GB in {stats.seconds:.1f} s"
      )
      sys.stdout.flush()
      return
  else:
    if not _CHECKPOINT.value:
      raise app.UsageError("orbax-to-hf needs --checkpoint")
    if _PROCESS_COUNT.value not in (None, 1):
      raise app.UsageError(
        "orbax-to-hf runs as one process (its --workers write different shards); drop --process_count"
      )
    stats = orbax_to_hf(
      _CHECKPOINT.value,
      _OUT_DIR.value,
      dtype=_DTYPE.value or "bfloat16",
      fp8=_FP8.value,
      layout=_LAYOUT.value,
      wrapper_config=_WRAPPER_CONFIG.value,
      workers=workers,
      progress=_PROGRESS.value,
    )
  if not stats.bytes_written:
    print(f"{argv[1]}: {_OUT_DIR.value} is already complete")
    return
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  rate = stats.bytes_read / max(stats.seconds, 1e-9) / 1e9
  print(
    f"{argv[1]}: wrote {_OUT_DIR.value}: read {stats.bytes_read / 1e9:.2f} GB, wrote "
    f"{stats.bytes_written / 1e9:.2f} GB in {stats.seconds:.1f} s ({rate:.2f} GB/s read), "
    f"peak RSS {rss:.2f} GiB"
  )
  sys.stdout.flush()


if __name__ == "__main__":
  flags.mark_flag_as_required("out_dir")
  app.run(main)
