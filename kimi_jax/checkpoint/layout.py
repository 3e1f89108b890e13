"""The Hugging Face release layouts, in one place: where config.json keeps the text model's config and which
tensor-name prefixes hold its weights. Nothing else in kimi-jax knows about wrappers or prefixes.

  k2   Kimi-K2-Instruct / -Base / -Instruct-0905 / -Thinking (and DeepSeek-V3-shaped checkpoints): config.json is
       the text model's own (model_type kimi_k2 or deepseek_v3); tensors `model.*` and `lm_head.weight`.
  k25  Kimi-K2.5 / K2.6 / K2.7: a multimodal wrapper. config.json has model_type kimi_k25, architectures
       [KimiK25ForConditionalGeneration], a top-level tie_word_embeddings (false in the releases), the text
       model's config under `text_config` (with its own quantization_config) and the MoonViT `vision_config`.
       Tensors: the K2 names behind `language_model.`, plus `vision_tower.*` and `mm_projector.*`.

kimi-jax models the text backbone only. Reading a k25 release skips the vision tensors (listed, so the converter
can say what it left out); writing one produces the text tensors and a wrapper config.json, no vision weights.
A tensor under a prefix the layout does not name is refused, so a new release never converts half-understood.

The wrapper's own fields (vision_config, token ids, auto_map, ...) describe weights kimi-jax does not hold, so
`hf_to_orbax` keeps them beside the converted checkpoint (WRAPPER_FILE) and `orbax_to_hf --layout k25` writes
them back: with the release's vision shards added to the index, the export is a complete K2.5 checkpoint again.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import json
from typing import Any

from kimi_jax.checkpoint.workdir import as_path

WRAPPER_FILE = "hf_wrapper.json"  # a converted k25 checkpoint's wrapper fields, all but text_config
TEXT_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
_TEXT_ROOTS = ("model", "lm_head")  # the first name component of every K2 text tensor


@dataclasses.dataclass(frozen=True)
class Layout:
  """k2: config.json is the text config; tensors carry the K2 names as they are."""

  name: str
  title: str  # for messages
  text_prefix: str = ""  # stored name = text_prefix + K2 name
  skipped_prefixes: tuple[str, ...] = ()  # tensors of other modalities, read past

  def hf_name(self, name: str) -> str:
    """The stored name of the K2 tensor `name` (e.g. "model.norm.weight")."""
    return self.text_prefix + name

  def skipped_tensors(self, names: Iterable[str], where: str) -> list[str]:
    """The tensors among `names` that this layout skips (sorted). Raises ValueError naming every prefix that is
    neither the text model's nor a skipped one: converting around tensors we cannot place would lose them."""
    skipped, unknown = [], {}
    for name in names:
      if name.startswith(self.skipped_prefixes):  # never true for no prefixes
        skipped.append(name)
      elif not (name.startswith(self.text_prefix) and name[len(self.text_prefix) :].split(".")[0] in _TEXT_ROOTS):
        prefix = name.split(".")[0] + "." if "." in name else name
        unknown.setdefault(prefix, []).append(name)
    if unknown:
      found = "; ".join(f"{p!r} ({len(n)} tensors, e.g. {min(n)!r})" for p, n in sorted(unknown.items()))
      known = [self.text_prefix + r + "." for r in _TEXT_ROOTS] + list(self.skipped_prefixes)
      raise ValueError(
        f"{where}: unknown tensor prefix {found} in a {self.title} checkpoint, whose tensors are "
        f"named {', '.join(known)}*; check that config.json's model_type matches the weights"
      )
    return sorted(skipped)

  def text_config(self, hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The text model's config.json dict (`hf` itself for k2). Raises ValueError naming a model_type that is
    neither a text model's nor a known wrapper's."""
    if hf.get("model_type") not in TEXT_MODEL_TYPES:
      raise ValueError(
        f"{where}: model_type {hf.get('model_type')!r} is not supported (expected "
        f"{', '.join(TEXT_MODEL_TYPES)} or the {K25.model_type} wrapper)"
      )
    return hf

  def text_where(self, where: str) -> str:
    """How messages name the text config inside config.json `where`."""
    return where

  def carried(self, hf: dict[str, Any]) -> dict[str, Any] | None:
    """The wrapper fields to keep beside a converted checkpoint (None: no wrapper)."""
    return None

  def hf_config(self, text: dict[str, Any], carried: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of a release in this layout holding the text model `text` (`carried`: see `carried`)."""
    return text


@dataclasses.dataclass(frozen=True)
class WrapperLayout(Layout):
  """k25: the text config sits under text_config of a multimodal wrapper."""

  model_type: str = ""
  architecture: str = ""

  # Fields the wrapper's writer sets itself: the rest of a release's wrapper is carried through as it was. A
  # top-level quantization_config would describe the release's INT4 experts, not what orbax_to_hf writes.
  _OWN = ("architectures", "model_type", "tie_word_embeddings", "text_config", "quantization_config")

  def text_config(self, hf: dict[str, Any], where: str) -> dict[str, Any]:
    text = hf.get("text_config")
    if not isinstance(text, dict):  # a ValueError like every config error: HFCheckpoint names it CheckpointError
      raise ValueError(  # noqa: TRY004
        f"{where}: model_type {self.model_type!r} is a multimodal wrapper but has no text_config object (found "
        f"{text!r}); it must hold the text model's config (model_type {' or '.join(TEXT_MODEL_TYPES)})"
      )
    text = dict(text)
    text_type = text.setdefault("model_type", "deepseek_v3")  # transformers' Kimi_K25Config default
    if text_type not in TEXT_MODEL_TYPES:
      raise ValueError(
        f"{where}: text_config.model_type {text_type!r} is not supported (expected {' or '.join(TEXT_MODEL_TYPES)})"
      )
    # transformers ties (or not) by the wrapper's flag, which defaults to true; the releases set it false and
    # ship language_model.lm_head.weight, which is what kimi-jax needs.
    if hf.get("tie_word_embeddings", True):
      value = hf.get("tie_word_embeddings", "absent (transformers' default: true)")
      raise ValueError(
        f"{where}: tie_word_embeddings is {value}; kimi-jax needs an untied lm_head "
        f"({self.text_prefix}lm_head.weight, tie_word_embeddings false as in the K2.5 releases)"
      )
    text["tie_word_embeddings"] = False
    outer, inner = hf.get("quantization_config"), text.get("quantization_config")
    if outer and inner and outer != inner:
      raise ValueError(
        f"{where}: quantization_config differs from text_config.quantization_config; "
        "keep the one that describes the stored weights"
      )
    if outer and not inner:
      text["quantization_config"] = outer
    return text

  def text_where(self, where: str) -> str:
    return f"{where} text_config"

  def carried(self, hf: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hf.items() if k not in self._OWN}

  def hf_config(self, text: dict[str, Any], carried: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
    out.update({k: v for k, v in (carried or {}).items() if k not in self._OWN})
    out.update(tie_word_embeddings=False, text_config=text)
    return out


K2 = Layout("k2", "Kimi K2")
K25 = WrapperLayout(
  "k25",
  "Kimi K2.5",
  text_prefix="language_model.",
  skipped_prefixes=("vision_tower.", "mm_projector."),
  model_type="kimi_k25",
  architecture="KimiK25ForConditionalGeneration",
)
LAYOUTS = {layout.name: layout for layout in (K2, K25)}


def detect(hf: dict[str, Any]) -> Layout:
  """The layout of a release from its config.json dict. Anything but the wrapper is read as k2, whose
  `text_config` refuses model types it does not know."""
  return K25 if hf.get("model_type") == K25.model_type else K2


def get(name: str) -> Layout:
  if name not in LAYOUTS:
    raise ValueError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}")
  return LAYOUTS[name]


def find_carried(layout: Layout, checkpoint: str, wrapper_config: str | None = None) -> dict[str, Any] | None:
  """The wrapper fields for exporting `checkpoint` in `layout`: from the release config.json `wrapper_config` if
  given, else from the WRAPPER_FILE that hf_to_orbax left in `checkpoint`, else None (a wrapper without them)."""
  if not isinstance(layout, WrapperLayout):
    if wrapper_config:
      raise ValueError(f"a wrapper config ({wrapper_config}) applies to the k25 layout only, not {layout.name}")
    return None
  if wrapper_config:
    hf = json.loads(as_path(wrapper_config).read_text())
    if hf.get("model_type") != layout.model_type:
      raise ValueError(
        f"{wrapper_config}: model_type {hf.get('model_type')!r} is not a {layout.title} wrapper ({layout.model_type!r})"
      )
    return layout.carried(hf)
  path = as_path(checkpoint) / WRAPPER_FILE  # local or gs://
  return json.loads(path.read_text()) if path.is_file() else None
