"""Shared test set-up: CPU only, float32 matmuls, and the session's `gcs` server.

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
