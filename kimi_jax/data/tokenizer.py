"""Tokenizers: the `Tokenizer` protocol the data pipeline needs, and a byte-level `ByteTokenizer`.

The Kimi tiktoken tokenizer (from a tiktoken.model file) will implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


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
