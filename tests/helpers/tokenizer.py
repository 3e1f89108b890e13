"""A tiny Kimi tokenizer for tests (never the real tiktoken.model): a byte-level BPE trained on the embedded corpus,
split by Kimi's pre-tokenisation pattern, written as a tiktoken rank file. Shared by tests/data and tests/gcs."""

from __future__ import annotations

import base64
import collections
import functools
import pathlib

import regex

from kimi_jax.data import sources
from kimi_jax.data.tokenizer import KIMI_PATTERN, KimiTokenizer

TRAINING_TEXT = (
  sources.load_corpus()[0][:6000] + "\n天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。 123456 7890 it's THEY'RE naïve café\n"
)
NUM_MERGES = 150


@functools.cache
def train_ranks(text: str = TRAINING_TEXT, num_merges: int = NUM_MERGES) -> dict[bytes, int]:
  """A tiny byte-level BPE on `text` split by Kimi's pattern: the 256 bytes, then one token per merge."""
  ranks = {bytes([b]): b for b in range(256)}
  words = [
    ([bytes([b]) for b in w.encode()], n)
    for w, n in collections.Counter(regex.findall(KIMI_PATTERN, text, flags=regex.V1)).items()
  ]
  for _ in range(num_merges):
    pairs = collections.Counter()
    for parts, n in words:
      for pair in zip(parts, parts[1:]):
        pairs[pair] += n
    a, b = max(pairs, key=lambda p: (pairs[p], p))
    ranks.setdefault(a + b, len(ranks))
    words = [(_merge(parts, a, b), n) for parts, n in words]
  return ranks


def _merge(parts: list[bytes], a: bytes, b: bytes) -> list[bytes]:
  out = []
  for part in parts:
    if out and out[-1] == a and part == b:
      out[-1] = a + b
    else:
      out.append(part)
  return out


def write_rank_file(path: pathlib.Path, ranks: dict[bytes, int]) -> pathlib.Path:
  """tiktoken format: `base64(token) rank` per line."""
  path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
  return path


def kimi_tokenizer(directory: pathlib.Path) -> KimiTokenizer:
  return KimiTokenizer.from_file(str(write_rank_file(directory / "tiktoken.model", train_ranks())))
