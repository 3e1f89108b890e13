"""Every path the tests read, stated once: the repository, the committed reference fixtures (tests/reference/, made
by the scripts there), and the run configs and docs some tests run or check."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

REFERENCE_DATA = TESTS / "reference" / "data"
TINY_HF = REFERENCE_DATA / "tiny_hf"  # make_fixture.py (reference.npz), make_generate_fixture.py (generate.npz)
TINY_FP8 = REFERENCE_DATA / "tiny_fp8"  # make_quant_fixture.py
TINY_INT4 = REFERENCE_DATA / "tiny_int4"  # make_quant_fixture.py
TINY_K25 = REFERENCE_DATA / "tiny_k25"  # make_k25_fixture.py
MUON_TORCH = REFERENCE_DATA / "muon_torch.npz"  # make_muon_fixture.py
ROUTER_GROUPS = REFERENCE_DATA / "router_groups.npz"  # make_router_fixture.py

TINY_CONFIG = REPO / "configs" / "tiny.py"
DOCS = REPO / "docs"


def python_path_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """`env` (default os.environ) with the repository and tests/ first on PYTHONPATH, for a child Python that imports
  kimi_jax, launch or helpers (a test file run as a script, a config file that imports helpers.train)."""
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(TESTS), env.get("PYTHONPATH")]))
  return env
