"""spread_layout: where Newton–Schulz runs on a mesh (kimi_jax/optim/ns_sharding.py)."""

from jax.sharding import PartitionSpec as P
import pytest

from kimi_jax.optim.ns_sharding import moved_spec, spread_layout

K2_MESH = {"data": 1, "fsdp": 8, "expert": 64, "tensor": 1}


def test_k2_experts_move_fsdp_onto_padded_layers():
  # [L=60, E=384, D=7168, F=2048], E over expert, D over fsdp: fsdp goes to L, padded 60 -> 64 (E would need 512).
  shape, spec = spread_layout((60, 384, 7168, 2048), P(None, "expert", "fsdp", None), K2_MESH)
  assert shape == (64, 384, 7168, 2048) and spec == P("fsdp", "expert", None, None)


def test_axis_that_fits_nowhere_stays_on_its_matrix_axis():
  # One dense layer: no batch axis can take fsdp or expert without 8x padding.
  shape, spec = spread_layout((1, 7168, 18432), P(None, ("fsdp", "expert"), None), K2_MESH)
  assert shape == (1, 7168, 18432) and spec == P(None, ("fsdp", "expert"), None)
  # 60 layers take fsdp (padded to 64), but not expert as well: that stays on D.
  shape, spec = spread_layout((60, 7168, 1536), P(None, ("fsdp", "expert"), None), K2_MESH)
  assert shape == (64, 7168, 1536) and spec == P("fsdp", "expert", None)


def test_unused_mesh_axes_join_and_existing_batch_axes_stay():
  shape, spec = spread_layout((4, 16, 32), P(None, "fsdp", None), {"data": 2, "fsdp": 2})
  assert shape == (4, 16, 32) and spec == P(("fsdp", "data"), None, None)
  shape, spec = spread_layout((8, 6, 16, 32), P(None, "expert", None, "fsdp"), {"fsdp": 2, "expert": 2})
  assert spec == P("fsdp", "expert", None, None) and shape == (8, 6, 16, 32)
  # No batch axes: nothing moves.
  assert spread_layout((16, 32), P("fsdp", None), {"fsdp": 2}) == ((16, 32), P("fsdp", None))


def test_padding_limit():
  # 7 layers over 4 devices needs 8 (14 % padding): refused at the default 12.5 %, taken at 20 %.
  assert spread_layout((7, 16, 32), P(None, "fsdp", None), {"fsdp": 4})[1] == P(None, "fsdp", None)
  assert spread_layout((7, 16, 32), P(None, "fsdp", None), {"fsdp": 4}, max_padding=0.2) == (
    (8, 16, 32),
    P("fsdp", None, None),
  )


def test_moved_spec_follows_moveaxis():
  assert moved_spec(P("a", "b", "c"), 3, (0, 2)) == P("b", "a", "c")
  assert moved_spec(P("a"), 4, (1, 3)) == P("a", None, None, None)
  assert moved_spec(P(None, "e", "f", None), 4, (3, 2)) == P(None, "e", None, "f")
  with pytest.raises(ValueError, match="needs"):
    spread_layout((4,), P(), {})
