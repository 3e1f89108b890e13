"""Tests for KimiTokenizer on a small BPE rank file (helpers/tokenizer.py; never the real tiktoken.model)."""

from __future__ import annotations

from helpers.tokenizer import kimi_tokenizer, train_ranks, write_rank_file
import numpy as np
import pytest

from kimi_jax.data import sources
from kimi_jax.data.tokenizer import (
  ByteTokenizer,
  KimiTokenizer,
  _pieces,
  load_tokenizer,
  special_token_names,
)

# Kimi K2's documented special ids (KIMI_K2_FACTS.md "Tokenizer and chat format"): 163,584 ranks first.
REAL_SPECIAL_IDS = {
  "[BOS]": 163584,
  "[EOS]": 163585,
  "<|im_end|>": 163586,
  "<|im_user|>": 163587,
  "<|im_assistant|>": 163588,
  "<|im_system|>": 163594,
  "<|tool_calls_section_begin|>": 163595,
  "<|tool_calls_section_end|>": 163596,
  "<|tool_call_begin|>": 163597,
  "<|tool_call_argument_begin|>": 163598,
  "<|tool_call_end|>": 163599,
  "<|im_middle|>": 163601,
  "[PAD]": 163839,
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> KimiTokenizer:
  return kimi_tokenizer(tmp_path_factory.mktemp("tok"))


def random_unicode(rng: np.random.Generator, n: int) -> str:
  """Characters from ASCII, Latin, combining marks, Greek, Han, emoji, whitespace and marker-like text."""
  ranges = [
    (0x20, 0x7E),
    (0x00C0, 0x024F),
    (0x0300, 0x036F),
    (0x0391, 0x03C9),
    (0x4E00, 0x9FFF),
    (0x1F300, 0x1F64F),
    (0x0E00, 0x0E7F),
  ]
  pieces = []
  for _ in range(n):
    kind = rng.integers(len(ranges) + 2)
    if kind == len(ranges):
      pieces.append(rng.choice([" ", "\n", "\t", "  ", "\r\n", "\u00a0", "\u3000"]))
    elif kind == len(ranges) + 1:
      pieces.append(rng.choice(["<|im_end|>", "[BOS]", "it's", "'LL", "12345"]))
    else:
      lo, hi = ranges[kind]
      pieces.append(chr(rng.integers(lo, hi + 1)))
  return "".join(pieces)


def test_special_ids_are_documented_for_the_real_rank_count():
  names = special_token_names(163584)
  assert len(names) == 256 and sorted(names.values()) == list(range(163584, 163840))
  assert {k: names[k] for k in REAL_SPECIAL_IDS} == REAL_SPECIAL_IDS
  assert names["<|reserved_token_163589|>"] == 163589 and names["<|reserved_token_163600|>"] == 163600


def test_special_ids_follow_the_ranks(tok):
  n = len(train_ranks())
  assert tok.vocab_size == n + 256
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 255)
  for name, real_id in REAL_SPECIAL_IDS.items():
    assert tok.special_id(name) == real_id - 163584 + n, name
  assert tok.special_id(f"<|reserved_token_{n + 5}|>") == n + 5
  assert tok.decode([tok.special_id("<|im_middle|>"), tok.pad_id]) == "<|im_middle|>[PAD]"


def test_round_trips_arbitrary_unicode(tok):
  rng = np.random.default_rng(0)
  for _ in range(100):
    text = random_unicode(rng, int(rng.integers(0, 80)))
    ids = tok.encode(text)
    assert all(0 <= i < len(train_ranks()) for i in ids), "encode(text) never yields special ids"
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(tok.encode(text, add_bos=True, add_eos=True))) == f"[BOS]{text}[EOS]"


def test_bpe_merges_and_kimi_pre_tokenisation(tok):
  text = sources.load_corpus()[0][:2000]
  assert len(tok.encode(text)) < 0.6 * len(text.encode())
  ranks = {bytes([b]): b for b in range(256)}
  for token in [b"12", b"123", b"1234", "世".encode()[:2], "世".encode(), "a世".encode()]:
    ranks[token] = len(ranks)
  small = KimiTokenizer(ranks)
  assert small.encode("1234") == [ranks[b"123"], ranks[b"4"]]  # digits in groups of at most 3
  assert small.encode("a世") == [ranks[b"a"], ranks["世".encode()]]  # Han runs are their own pieces


def test_long_runs_are_cut_like_the_real_tokenizer():
  text = "a" * 60_000 + "   b"
  assert [len(p) for p in _pieces(text)] == [25_000, 25_000, 10_004]
  text = "ab " * 150_000
  pieces = list(_pieces(text))
  assert "".join(pieces) == text and len(pieces) == 2 and len(pieces[0]) == 400_000


def test_special_tokens_in_text(tok):
  text = "hi<|im_end|>there"
  assert tok.special_id("<|im_end|>") not in tok.encode(text)
  assert tok.decode(tok.encode(text)) == text
  ids = tok.encode(text, allowed_special={"<|im_end|>"})
  assert ids.count(tok.special_id("<|im_end|>")) == 1 and tok.decode(ids) == text
  im_end = tok.special_id("<|im_end|>")
  assert tok.encode("[BOS]x<|im_end|>", allowed_special="all") == [tok.bos_id, *tok.encode("x"), im_end]


def test_unknown_special_token_is_a_clear_error(tok):
  with pytest.raises(ValueError, match=r"unknown special token '<\|im_ends\|>'; did you mean '<\|im_end\|>'"):
    tok.special_id("<|im_ends|>")
  with pytest.raises(ValueError, match=r"unknown special token '<\|nope\|>'"):
    tok.encode("x", allowed_special={"<|im_end|>", "<|nope|>"})
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


def test_bad_rank_files(tmp_path):
  bad = tmp_path / "bad.model"
  bad.write_text("IQ== 0\nnot-base64!! 1\n")
  with pytest.raises(ValueError, match=r"bad.model:2 is not a `base64 rank` line"):
    KimiTokenizer.from_file(str(bad))
  with pytest.raises(ValueError, match="lacks 255 single-byte tokens"):
    KimiTokenizer.from_file(str(write_rank_file(tmp_path / "short.model", {b"a": 0})))
  with pytest.raises(ValueError, match=r"ranks must be exactly 0\.\.256"):
    KimiTokenizer({**{bytes([b]): b for b in range(256)}, b"ab": 300})


def test_load_tokenizer(tmp_path):
  assert isinstance(load_tokenizer("byte"), ByteTokenizer)
  kimi = load_tokenizer(str(write_rank_file(tmp_path / "t.model", train_ranks())))
  assert isinstance(kimi, KimiTokenizer) and kimi.vocab_size == len(train_ranks()) + 256
