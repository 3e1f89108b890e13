"""Tokenizers: the `Tokenizer` protocol the data pipeline needs, a byte-level `ByteTokenizer` (the embedded
default) and `KimiTokenizer`, Kimi K2's tiktoken BPE loaded from a user-supplied `tiktoken.model` file.

Kimi K2's vocabulary is 163,584 BPE ranks followed by 256 special ids, 163,840 in all. The special ids start at
the number of ranks in the file (163584 for the real one), so a small test rank file gets the same layout
shifted down: [BOS] = base, [EOS] = base + 1, <|im_end|> = base + 2, ..., [PAD] = base + 255.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence, Set
import difflib
import re
from typing import Literal, Protocol

import numpy as np
import tiktoken

from kimi_jax.checkpoint.workdir import as_path, check_bucket


class Tokenizer(Protocol):
  """What the pipeline and generation need from a tokenizer. Special ids are never produced by `encode(text)`."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258 (vocab_size 259)."""

  vocab_size = 259
  bos_id = 256
  eos_id = 257
  pad_id = 258

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

  def decode(self, ids: Sequence[int]) -> str:
    """Skips special ids; invalid UTF-8 (e.g. a multi-byte character cut in half) becomes U+FFFD."""
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


# Kimi K2's pre-tokenisation: Han runs on their own, then words (a leading non-letter, an optional casing run,
# lower-case letters, an English contraction), 1-3 digit groups, punctuation runs, newlines and spaces.
# `&&` is character-class intersection (letters that are not Han).
KIMI_PATTERN = "|".join(
  [
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
  ]
)

NUM_SPECIAL_IDS = 256
# Named special ids as offsets from the first one (= the number of BPE ranks); the others are reserved and named
# `<|reserved_token_{id}|>` as in the real tokenizer.
_NAMED_SPECIALS = {
  0: "[BOS]",
  1: "[EOS]",
  2: "<|im_end|>",
  3: "<|im_user|>",
  4: "<|im_assistant|>",
  6: "<|start_header_id|>",
  7: "<|end_header_id|>",
  9: "[EOT]",
  10: "<|im_system|>",
  11: "<|tool_calls_section_begin|>",
  12: "<|tool_calls_section_end|>",
  13: "<|tool_call_begin|>",
  14: "<|tool_call_argument_begin|>",
  15: "<|tool_call_end|>",
  17: "<|im_middle|>",
  254: "[UNK]",
  255: "[PAD]",
}
# tiktoken cannot encode a piece of more than ~400k characters and is slow on long runs of whitespace or
# non-whitespace; the real tokenizer cuts text at these lengths, and so do we, at the same places.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


def special_token_names(num_ranks: int) -> dict[str, int]:
  """All 256 special token names -> ids for a rank file of `num_ranks` ranks (163584 for Kimi K2)."""
  return {
    _NAMED_SPECIALS.get(offset, f"<|reserved_token_{num_ranks + offset}|>"): num_ranks + offset
    for offset in range(NUM_SPECIAL_IDS)
  }


class KimiTokenizer:
  """Kimi K2's tokenizer: byte-level BPE (tiktoken) with `KIMI_PATTERN` and 256 special ids after the ranks.

  `encode(text)` treats text that looks like a special token ("<|im_end|>") as ordinary text unless its name is
  in `allowed_special`; `decode` renders special ids by name, so generated tool-call sections can be parsed.
  """

  def __init__(self, mergeable_ranks: dict[bytes, int], *, name: str = "kimi"):
    n = len(mergeable_ranks)
    if sorted(mergeable_ranks.values()) != list(range(n)):
      raise ValueError(f"{name}: BPE ranks must be exactly 0..{n - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
    if missing:
      raise ValueError(
        f"{name}: the rank file lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); "
        "byte-level BPE needs all 256"
      )
    self.special_tokens = special_token_names(n)
    self._encoding = tiktoken.Encoding(
      name,
      pat_str=KIMI_PATTERN,
      mergeable_ranks=mergeable_ranks,
      special_tokens=self.special_tokens,
      explicit_n_vocab=n + NUM_SPECIAL_IDS,
    )
    self.vocab_size = n + NUM_SPECIAL_IDS
    self.bos_id = self.special_id("[BOS]")
    self.eos_id = self.special_id("[EOS]")
    self.pad_id = self.special_id("[PAD]")

  @classmethod
  def from_file(cls, path: str) -> KimiTokenizer:
    """Loads a tiktoken rank file: one `base64(token bytes) rank` per line (Kimi's `tiktoken.model`); a local path
    or a URL (gs://...)."""
    check_bucket(path)
    try:
      lines = as_path(path).read_bytes().splitlines()
    except FileNotFoundError as e:  # gcsfs names the object without gs://
      raise FileNotFoundError(f"tokenizer file {path} does not exist") from e
    ranks = {}
    for lineno, line in enumerate(lines, 1):
      if not line:
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError as e:  # also binascii.Error
        raise ValueError(f"{path}:{lineno} is not a `base64 rank` line: {line[:80]!r}") from e
    return cls(ranks, name=str(path))

  def special_id(self, name: str) -> int:
    """The id of a special token, e.g. "<|im_end|>"; a clear error for an unknown name."""
    if name not in self.special_tokens:
      raise self._unknown_special(name)
    return self.special_tokens[name]

  def encode(
    self,
    text: str,
    add_bos: bool = False,
    add_eos: bool = False,
    allowed_special: Literal["all"] | Set[str] = frozenset(),
  ) -> list[int]:
    """text -> ids. Special token names in `allowed_special` ("all": every one) found in text become their ids."""
    allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
    unknown = allowed - self.special_tokens.keys()
    if unknown:
      raise self._unknown_special(min(unknown))
    ids = [self.bos_id] if add_bos else []
    for piece in _pieces(text):
      ids += self._encoding.encode(piece, allowed_special=allowed, disallowed_special=())
    return ids + [self.eos_id] * add_eos

  def decode(self, ids: Sequence[int]) -> str:
    """ids -> text; special ids become their names; invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
    return self._encoding.decode(ids.tolist())

  def _unknown_special(self, name: str) -> ValueError:
    close = difflib.get_close_matches(name, [s for s in self.special_tokens if "reserved" not in s], n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown special token {name!r}{hint}")


def _pieces(text: str) -> Iterator[str]:
  """Cuts text every 400k characters, then inside runs of whitespace / non-whitespace longer than 25k."""
  for start in range(0, len(text), _MAX_ENCODE_CHARS):
    window = text[start : start + _MAX_ENCODE_CHARS]
    cut = 0
    for run in _RUNS.finditer(window):
      for end in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
        yield window[cut:end]
        cut = end
    yield window[cut:]


def load_tokenizer(spec: str) -> Tokenizer:
  """ "byte" -> ByteTokenizer; anything else is the path (or gs:// URL) of a tiktoken.model file -> KimiTokenizer."""
  return ByteTokenizer() if spec == "byte" else KimiTokenizer.from_file(spec)
