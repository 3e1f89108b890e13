"""Kimi K2.5 / K2.6 / K2.7 releases (the multimodal wrapper, kimi_jax/checkpoint/layout.py): the text backbone
converts and matches transformers' kimi_k25 logits (tests/reference/make_k25_fixture.py), the vision tensors are
skipped in one reported line, anything else is refused by name, and orbax-to-hf writes either layout."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

from flax import nnx
from helpers.paths import TINY_INT4, TINY_K25
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kimi_jax.checkpoint import layout as layouts
from kimi_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from kimi_jax.checkpoint.hf import CheckpointError, HFCheckpoint, flatten
from kimi_jax.checkpoint.model_io import load_config, load_model, restore_state

PREFIX = "language_model."


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(checkpoint dir, Stats, what hf_to_orbax printed) for tiny_k25 converted in float32."""
  out = str(tmp_path_factory.mktemp("k25") / "ckpt")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    stats = hf_to_orbax(str(TINY_K25), out, workers=2)
  return out, stats, printed.getvalue()


def _release_config():
  with open(TINY_K25 / "config.json") as f:
    return json.load(f)


def _header_bytes(directory, names):
  """Stored bytes of `names`, from the safetensors headers' data offsets (independent of the reader)."""
  with open(os.path.join(directory, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  total = 0
  for shard in {weight_map[n] for n in names}:
    with open(os.path.join(directory, shard), "rb") as f:
      header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total += sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in header.items() if n in names)
  return total


def test_k25_release_converts_and_matches_transformers(converted):
  out, _, _ = converted
  ref = np.load(TINY_K25 / "reference.npz")
  cfg, model = load_model(out, dtype="float32")
  assert cfg == HFCheckpoint(TINY_INT4).config(param_dtype="float32", dtype="float32")  # the K2-Thinking text model
  logits = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(ref["tokens"]))  # jit: compiles faster than eager
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_vision_tensors_are_skipped_in_one_line(converted):
  out, stats, printed = converted
  ckpt = HFCheckpoint(TINY_K25)
  vision = [n for n in ckpt.weight_map if not n.startswith(PREFIX)]
  assert len(vision) == 23 and sorted(vision) == ckpt.skipped
  nbytes = _header_bytes(TINY_K25, set(vision))
  assert (stats.skipped_tensors, stats.skipped_bytes) == (23, nbytes) and nbytes == 40576
  assert [line for line in printed.splitlines() if "skipping" in line] == [
    (
      f"hf-to-orbax: skipping 23 tensors ({nbytes:,} bytes, 0.00 GB) outside the text model: mm_projector.*, "
      "vision_tower.*"
    )
  ]
  with open(os.path.join(out, layouts.WRAPPER_FILE)) as f:
    kept = json.load(f)  # the wrapper's own fields, kept for orbax-to-hf --layout k25
  release = _release_config()
  assert kept["vision_config"] == release["vision_config"] and kept["image_token_id"] == 163605
  assert not set(kept) & {"text_config", "model_type", "architectures", "quantization_config"}


def _export_cli(checkpoint, out, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "kimi_jax.convert",
      "orbax-to-hf",
      "--checkpoint",
      checkpoint,
      "--out_dir",
      str(out),
      "--noprogress",
      *args,
    ],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]


def _text_names(ckpt):
  """The logical text-tensor names of a release (INT4 triplets as one weight)."""
  return sorted(
    {
      n.removesuffix("_packed")
      for n in ckpt.weight_map
      if n.startswith(PREFIX) and not n.endswith(("_scale", "_shape"))
    }
  )


def test_k25_export_in_float32_round_trips_exactly(converted, tmp_path):
  """orbax-to-hf --layout k25 --dtype float32, then hf-to-orbax again: the same weights bit for bit. The INT4
  experts come back as float32 (their dequantised values, exact), and the config says so: no quantization_config."""
  out, _, _ = converted
  _export_cli(out, tmp_path / "hf", "--layout", "k25", "--dtype", "float32")
  src, exported = HFCheckpoint(TINY_K25), HFCheckpoint(str(tmp_path / "hf"))
  assert exported.layout is layouts.K25 and exported.skipped == []  # no vision weights are written
  hf = exported.hf_config
  release = _release_config()
  assert (hf["model_type"], hf["architectures"], hf["tie_word_embeddings"]) == (
    "kimi_k25",
    ["KimiK25ForConditionalGeneration"],
    False,
  )
  assert {k: v for k, v in hf.items() if k != "text_config"} == {
    k: v for k, v in release.items() if k != "text_config"
  }  # the wrapper's fields carried through
  assert "quantization_config" not in hf["text_config"]
  assert exported.config().architecture() == src.config().architecture()
  assert sorted(exported.weight_map) == _text_names(src)
  for name in exported.weight_map:
    np.testing.assert_array_equal(exported.read(name), src.read(name), err_msg=name)

  hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "again"))
  cfg = load_config(out)
  first, again = flatten(restore_state(out, cfg)), flatten(restore_state(str(tmp_path / "again"), cfg))
  assert first.keys() == again.keys()
  for path, value in first.items():
    assert np.asarray(value).tobytes() == np.asarray(again[path]).tobytes(), ".".join(path)


def test_k25_export_in_bfloat16_rounds_only_the_int4_experts(converted, tmp_path):
  """The default bf16 export keeps every BF16 / F32 tensor of the release bit for bit; an INT4 expert
  (int4 × bf16 scale: up to 12 significant bits) is its dequantised value rounded to bf16, not the release's INT4."""
  out, _, _ = converted
  orbax_to_hf(out, str(tmp_path / "hf"), layout="k25")
  src, exported = HFCheckpoint(TINY_K25), HFCheckpoint(str(tmp_path / "hf"))
  rounded = 0
  for name in exported.weight_map:
    value = exported._file(name).get(name)
    if name in src.weight_map:
      stored = src._file(name).get(name)
      assert value.dtype == stored.dtype and value.tobytes() == stored.tobytes(), name
    else:
      assert ".mlp.experts." in name and value.dtype == ml_dtypes.bfloat16, name
      exact = src.read(name)
      np.testing.assert_array_equal(value, exact.astype(ml_dtypes.bfloat16), err_msg=name)
      rounded += int(np.any(value.astype(np.float32) != exact))
  assert rounded > 0  # the rounding is real: bf16 export is lossy for INT4 experts, float32 is not


def test_k2_layout_export_is_unchanged(converted, tmp_path):
  """--layout k2 (the default) writes Kimi K2 names and config.json: the same files as exporting K2-Thinking."""
  out, _, _ = converted
  orbax_to_hf(out, str(tmp_path / "from_k25"))
  hf_to_orbax(str(TINY_INT4), str(tmp_path / "int4"))
  orbax_to_hf(str(tmp_path / "int4"), str(tmp_path / "from_int4"))
  names = sorted(os.listdir(tmp_path / "from_int4"))
  assert names == sorted(os.listdir(tmp_path / "from_k25")) and "config.json" in names
  for name in names:
    assert (tmp_path / "from_k25" / name).read_bytes() == (tmp_path / "from_int4" / name).read_bytes(), name
  assert HFCheckpoint(str(tmp_path / "from_k25")).layout is layouts.K2


def test_k25_export_without_wrapper_fields(converted, tmp_path, capsys):
  """A checkpoint that kept no wrapper fields (e.g. a training workdir) exports a wrapper without vision_config,
  and says so; a release config.json given as wrapper_config supplies them."""
  out, _, _ = converted
  bare = tmp_path / "bare"
  shutil.copytree(out, bare)
  os.remove(bare / layouts.WRAPPER_FILE)
  orbax_to_hf(str(bare), str(tmp_path / "hf"), layout="k25")
  assert "no vision_config" in capsys.readouterr().out
  hf = HFCheckpoint(str(tmp_path / "hf")).hf_config
  assert "vision_config" not in hf and hf["model_type"] == "kimi_k25"
  orbax_to_hf(str(bare), str(tmp_path / "hf2"), layout="k25", wrapper_config=str(TINY_K25 / "config.json"))
  assert HFCheckpoint(str(tmp_path / "hf2")).hf_config["vision_config"] == _release_config()["vision_config"]
  with pytest.raises(ValueError, match="unknown layout 'k3'"):
    orbax_to_hf(str(bare), str(tmp_path / "hf3"), layout="k3")


# Named refusals ------------------------------------------------------------------------------------------------


def _copy(tmp_path, edit_config=None, edit_index=None):
  d = tmp_path / "hf"
  shutil.copytree(TINY_K25, d)
  for name, edit in (("config.json", edit_config), ("model.safetensors.index.json", edit_index)):
    if edit:
      obj = json.loads((d / name).read_text())
      edit(obj)
      (d / name).write_text(json.dumps(obj))
  return str(d)


def test_unknown_tensor_prefix_is_refused(tmp_path):
  d = _copy(
    tmp_path,
    edit_index=lambda i: i["weight_map"].update({"audio_tower.conv.weight": "model-00001-of-00002.safetensors"}),
  )
  with pytest.raises(
    CheckpointError,
    match=r"hf: unknown tensor prefix 'audio_tower\.' \(1 tensors, e\.g\. "
    r"'audio_tower\.conv\.weight'\).*language_model\.model\.",
  ):
    hf_to_orbax(d, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # refused before anything is written


def test_unprefixed_text_tensor_in_a_wrapper_is_refused(tmp_path):
  def unprefix(index):
    index["weight_map"]["model.norm.weight"] = index["weight_map"].pop("language_model.model.norm.weight")

  with pytest.raises(
    CheckpointError,
    match=r"unknown tensor prefix 'model\.' \(1 tensors, e\.g\. "
    r"'model\.norm\.weight'\) in a Kimi K2\.5 checkpoint",
  ):
    HFCheckpoint(_copy(tmp_path, edit_index=unprefix))


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda c: c.pop("text_config"), r"config\.json: model_type 'kimi_k25' is a multimodal wrapper.*no text_config"),
    (lambda c: c["text_config"].update(model_type="llama"), r"config\.json: text_config\.model_type 'llama'"),
    (lambda c: c.update(model_type="kimi_k3"), r"config\.json: model_type 'kimi_k3' is not supported"),
    (lambda c: c.pop("tie_word_embeddings"), r"config\.json: tie_word_embeddings is absent"),
    (
      lambda c: c.update(quantization_config={"quant_method": "fp8"}),
      r"config\.json: quantization_config differs from text_config\.quantization_config",
    ),
    (
      lambda c: c["text_config"]["quantization_config"].update(format="float-quantized"),
      r"config\.json text_config: compressed-tensors format 'float-quantized'",
    ),
  ],
  ids=[
    "no_text_config",
    "text_model_type",
    "unknown_model_type",
    "tie_absent",
    "quantization_conflict",
    "text_quantization",
  ],
)
def test_malformed_wrapper_is_refused_by_name(tmp_path, edit, message):
  with pytest.raises(CheckpointError, match=message):
    HFCheckpoint(_copy(tmp_path, edit_config=edit))


def test_text_config_errors_name_text_config(tmp_path):
  ckpt = HFCheckpoint(_copy(tmp_path, edit_config=lambda c: c["text_config"].update(moe_layer_freq=2)))
  with pytest.raises(ValueError, match=r"config\.json text_config moe_layer_freq=2 is not supported"):
    ckpt.config()
