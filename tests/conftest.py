"""Shared test set-up: CPU only, float32 matmuls, the session's `gcs` server, a per-module compilation cache.

Tests are grouped by package (tests/model, tests/checkpoint, tests/data, ...); pytest imports them in its default
`prepend` mode, so basenames stay unique across folders, and this file's directory (tests/) is on sys.path: what
several folders share is in tests/helpers (`from helpers.paths import TINY_HF`), synthetic releases in tests/builders.
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def gcs():
  """A GCS API server on 127.0.0.1 (fake-gcs-server, in memory) for the session, with the standard emulator
  variables pointing at it; see tests/helpers/gcs_server.py."""
  import logging

  from helpers.gcs_server import FakeGCS

  # gcsfs asks the storage control API (which needs real credentials) for each bucket's layout and warns on every
  # call when it cannot; the answer does not matter here.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  server = FakeGCS().start()
  yield server
  server.stop()


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one test module (`pytestmark = pytest.mark.usefixtures(...)`), for modules
  that compile the same train step several times, in-process and in CLI runs: once, then ~2 s a run on 2 cores
  instead of ~20. Yields the environment variables that give a child process the same cache. Restored afterwards,
  so other modules compile as before."""
  from jax._src import compilation_cache as cc

  directory = str(tmp_path_factory.mktemp("jax_cache"))
  settings = {
    "jax_compilation_cache_dir": directory,
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  saved = {k: getattr(jax.config, k) for k in settings}
  for k, v in settings.items():
    jax.config.update(k, v)
  yield {k.upper(): str(v) for k, v in settings.items()}
  for k, v in saved.items():
    jax.config.update(k, v)
  cc.reset_cache()  # the cache object outlives the setting otherwise (what jax's own test_util does)
