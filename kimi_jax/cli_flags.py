"""Command-line flags that several CLIs share, each defined once.

Every CLI (`python -m kimi_jax.train | forward | generate | convert | data.prepare | tools.plan | tools.aot`)
defines its own flags at module level, as flax's examples do, and imports this module for the shared ones. absl
flags live in one process-wide registry, so a name defined by two modules could not be imported together (train
imports generate; tools.aot imports train); defining the shared names here is what lets every CLI module be
imported as a library. Which shared flags a CLI requires it says in its `__main__` block
(`flags.mark_flags_as_required`), so importing it requires nothing.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from kimi_jax.config import DTYPES, MOE_IMPLS

CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Run configuration file (configs/*.py); --config.X=... overrides."
)
CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Model checkpoint (hf-to-orbax output) or training workdir, local or gs://."
)
DTYPE = flags.DEFINE_enum("dtype", None, list(DTYPES), "Parameter and compute dtype (default: the command's).")
MOE_IMPL = flags.DEFINE_enum("moe_impl", None, list(MOE_IMPLS), "Expert compute implementation (kimi_jax/backend.py).")
MESH = flags.DEFINE_string(
  "mesh",
  "",
  "Device mesh, e.g. fsdp=2,expert=4 (kimi_jax/sharding.py); '': one device. Any batch size; experts run dropless.",
)
OUT = flags.DEFINE_string("out", None, "Output .npy file.")
TOKENIZER = flags.DEFINE_string("tokenizer", "byte", '"byte" or the path (or gs:// URL) of Kimi\'s tiktoken.model.')
JSON = flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
