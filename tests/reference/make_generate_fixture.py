"""Greedy `generate()` reference from Hugging Face transformers on the tiny fixture checkpoint.

Writes ``tests/reference/data/tiny_hf/generate.npz`` (read by ``tests/generate/test_generate.py``):

  prompts      int32 [P, S]     prompt ids, row p valid in [0, prompt_lengths[p]), right-padded with -1
  prompt_lengths int32 [P]      1, 7 and 12 (one token; mid; the reference.npz length)
  tokens       int32 [P, N]     greedy continuation, at most N = 24 new tokens; a row that produced the EOS id
                                (2, the stop token) ends with it and is right-padded with -1
  logits       f32 [P, N, V]    full-forward logits (no cache) at the positions that chose each new token
                                (0 pads); generate()'s own cached logits agree to ≤ 1e-4 and pick the same ids
  min_margin   f32 []           smallest top-1 minus top-2 logit over all steps (greedy ties would be fragile)

Each prompt is generated on its own (batch 1, no padding), so the reference has no padding convention for a
batched implementation to match. The model is ``DeepseekV3ForCausalLM`` in float32 with eager attention and
the eager expert loop, loaded exactly as ``make_fixture.py`` does (its kimi_k2 conversion-mapping fix and its
tensor-by-tensor check that every loaded weight equals the committed files). Generation uses the model's own
generation config (EOS id 2 stops a row, as in the release's config), so the fixture covers both a full-length
row and rows stopped by EOS. The script also checks that the cached decode logits equal an uncached full
forward over the final sequence (≤ 1e-4) and that every greedy choice has a clear top-1 margin.

    /work/refenv/bin/python tests/reference/make_generate_fixture.py       # from the repo root, ~5 s

Versions: transformers 5.23.0, torch 2.13.0+cpu (as make_fixture.py); deterministic.
"""

from __future__ import annotations

from pathlib import Path
import sys

import numpy as np
from safetensors.torch import load_file
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixture  # noqa: E402  (registers the kimi_k2 -> deepseek_v3 conversion mapping on import)

OUT = make_fixture.OUT_DIR / "generate.npz"
PROMPT_LENGTHS = (1, 7, 12)
NEW_TOKENS = 24
SEED = 7


@torch.no_grad()
def main() -> None:
  torch.manual_seed(SEED)
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  weights = make_fixture.gen_weights(make_fixture.CONFIG, make_fixture.SEED)
  on_disk = {}
  for shard in sorted(make_fixture.OUT_DIR.glob("model-*.safetensors")):
    on_disk.update(load_file(str(shard)))
  assert sorted(on_disk) == sorted(weights), "committed checkpoint names differ from make_fixture's"
  for name, tensor in weights.items():
    assert torch.equal(on_disk[name], tensor), f"committed {name} differs from make_fixture's weights"
  model = make_fixture._load_and_verify(weights, "eager")  # asserts every loaded tensor equals the files

  vocab = make_fixture.CONFIG["vocab_size"]
  rng = np.random.default_rng(SEED)
  width = max(PROMPT_LENGTHS)
  prompts = np.full((len(PROMPT_LENGTHS), width), -1, np.int32)
  logits = np.zeros((len(PROMPT_LENGTHS), NEW_TOKENS, vocab), np.float32)
  eos = make_fixture.CONFIG["eos_token_id"]
  tokens = np.full((len(PROMPT_LENGTHS), NEW_TOKENS), -1, np.int32)
  for p, n in enumerate(PROMPT_LENGTHS):
    prompt = rng.integers(3, vocab, size=n)  # avoid the remapped bos/eos ids 1, 2
    prompts[p, :n] = prompt
    out = model.generate(
      torch.from_numpy(prompt[None]),
      max_new_tokens=NEW_TOKENS,
      do_sample=False,
      pad_token_id=0,
      use_cache=True,
      output_logits=True,
      return_dict_in_generate=True,
    )
    new = out.sequences[0, n:].numpy()
    assert len(new) == NEW_TOKENS or new[-1] == eos, new
    tokens[p, : len(new)] = new
    cached = torch.stack(out.logits)[:, 0].numpy()
    assert np.array_equal(cached.argmax(-1), new), "generate() did not pick the argmax"
    logits[p, : len(new)] = model(out.sequences, use_cache=False).logits[0, n - 1 : -1].numpy()
    assert np.array_equal(logits[p, : len(new)].argmax(-1), new), "the full forward picks other tokens"
    err = float(np.abs(cached - logits[p, : len(new)]).max())
    assert err < 1e-4, f"cached decode differs from the full forward by {err}"
    print(f"prompt {p} ({n} tokens): {new.tolist()}  (cache vs full forward: {err:.1e})")
  top2 = np.sort(logits, axis=-1)[..., -2:][tokens >= 0]
  margin = float((top2[:, 1] - top2[:, 0]).min())
  print(f"smallest greedy margin {margin:.4f}")
  assert margin > 1e-3, margin
  np.savez(
    OUT,
    prompts=prompts,
    prompt_lengths=np.asarray(PROMPT_LENGTHS, np.int32),
    tokens=tokens,
    logits=logits,
    min_margin=np.float32(margin),
  )
  print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
