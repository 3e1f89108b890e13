"""Generation: cached decode against the full forward, greedy output against transformers, cache sizes,
sampling filters, stop tokens, streaming and bad input."""

import base64
import os
import subprocess
import sys

from flax import nnx
from helpers.paths import TINY_HF
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import generate as gen
from kimi_jax.checkpoint.hf import HFCheckpoint, load_state
from kimi_jax.config import kimi_k2, tiny
from kimi_jax.model import KimiK2


@pytest.fixture(scope="module")
def hf_model():
  ckpt = HFCheckpoint(TINY_HF)
  cfg = ckpt.config(dtype="float32")
  model = nnx.eval_shape(lambda: KimiK2(cfg, rngs=nnx.Rngs(0)))
  nnx.update(model, jax.tree.map(jnp.asarray, load_state(ckpt, cfg)))
  return model


@pytest.fixture(scope="module")
def hf_generate():
  return dict(np.load(TINY_HF / "generate.npz"))


def random_model(cfg, seed):
  """A model of `cfg` with random weights: kernels N(0, 1/fan_in), embedding N(0, 1), norms 1 + N(0, 0.1²),
  router bias N(0, 0.1²). Filled from numpy, which is much faster than initialising eagerly."""
  model = nnx.eval_shape(lambda: KimiK2(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = path[-1].key
    if name == "scale":
      return 1 + 0.1 * rng.normal(size=a.shape)
    if name == "bias":
      return 0.1 * rng.normal(size=a.shape)
    return rng.normal(size=a.shape) / (1 if name == "embedding" else np.sqrt(a.shape[-2]))

  state = nnx.state(model, nnx.Variable).to_pure_dict()
  nnx.update(model, jax.tree_util.tree_map_with_path(lambda p, a: jnp.asarray(draw(p, a), a.dtype), state))
  return model


def teacher_forced_logits(model, prompts, forced, *, kind="latent", impl="xla"):
  """Prefill `prompts`, then feed forced[:, i] at step i (as `generate` would, with the same buffer shapes).

  Returns logits [B, steps + 1, V]: after the prompt, then after each forced token.
  """
  steps = forced.shape[1]
  tokens, lengths, max_len = gen.pack_prompts(prompts, model.cfg, steps + 1, None)
  logits, state = gen.prefill(model, tokens, lengths, max_len=max_len, kind=kind)
  out = [logits]
  for i in range(steps):
    logits, state = gen.decode_step(model, state, forced[:, i], impl=impl)
    out.append(logits)
    if i == 0:
      compiled = gen._decode._cache_size()
  assert steps < 2 or gen._decode._cache_size() == compiled, "the decode step recompiled"
  np.testing.assert_array_equal(state.lengths, lengths + steps)
  return np.stack(out, axis=1)


def hf_prompts(ref):
  return [p[:n].tolist() for p, n in zip(ref["prompts"], ref["prompt_lengths"])]


def test_decode_matches_full_forward_on_the_fixture(hf_model, hf_generate):
  """Prompts of 1, 7 and 12 tokens in one batch, fed transformers' greedy tokens; transformers' full-forward
  logits (no cache) are the reference at every step a row is still running."""
  ref = hf_generate
  forced = np.maximum(ref["tokens"][:, :-1], 0)
  got = teacher_forced_logits(hf_model, hf_prompts(ref), forced)
  running = ref["tokens"] >= 0
  np.testing.assert_allclose(got[running], ref["logits"][running], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_model():
  return random_model(tiny(dtype="float32", moe_impl="dense"), seed=1)


@pytest.fixture(scope="module")
def tiny_greedy(tiny_model):
  """A 9-token prompt and its 7-token greedy continuation by the compatibility `sample()`."""
  prompt = np.random.default_rng(1).integers(0, tiny_model.cfg.vocab_size, 9).tolist()
  return prompt, gen.sample(tiny_model, prompt, max_new_tokens=7)


@pytest.mark.parametrize("kind", ["latent", pytest.param("expanded", marks=pytest.mark.slow)])
def test_decode_matches_full_forward_on_a_random_tiny_model(tiny_model, tiny_greedy, kind):
  """Our own full forward over prompt + greedy continuation is the reference: decode logits match it at every
  step, and its argmax is the continuation."""
  prompt, new = tiny_greedy
  full = np.asarray(nnx.jit(lambda m, t: m(t)[0])(tiny_model, jnp.asarray([prompt + new])))[0, len(prompt) - 1 : -1]
  assert full.argmax(-1).tolist() == new
  got = teacher_forced_logits(tiny_model, [prompt], np.asarray([new[:-1]]), kind=kind)[0]
  np.testing.assert_allclose(got, full, atol=1e-4, rtol=0)


def test_model_forward_with_a_cache(tiny_model, tiny_greedy):
  """`KimiK2.__call__` itself, with a cache: a prefill, then a decode step, give the full forward's logits."""
  prompt, new = tiny_greedy
  n = len(prompt)
  tokens = jnp.asarray([prompt + new[:1]])
  forward = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c))
  full, _ = forward(tiny_model, tokens, None, None)
  logits, aux = forward(tiny_model, tokens[:, :n], None, gen.init_cache(tiny_model.cfg, 1, 16))
  np.testing.assert_allclose(logits[0], full[0, :n], atol=1e-4, rtol=0)
  step, aux = forward(tiny_model, tokens[:, n:], jnp.asarray([[n]]), aux["cache"])
  np.testing.assert_allclose(step[0, 0], full[0, n], atol=1e-4, rtol=0)
  assert jax.tree.map(lambda a: a.shape[2], aux["cache"]) == {g: {"latent": 16, "rope": 16} for g in aux["cache"]}


def test_sample_keeps_the_training_demo_signature(tiny_model, tiny_greedy):
  prompt, new = tiny_greedy
  stop = new[3]
  assert gen.sample(tiny_model, prompt, max_new_tokens=7, stop_token=stop) == new[: new.index(stop)]
  hot = gen.sample(tiny_model, prompt, max_new_tokens=7, temperature=1.0, seed=3)
  assert len(hot) == 7 and hot == gen.sample(tiny_model, prompt, max_new_tokens=7, temperature=1.0, seed=3)


@pytest.mark.slow
def test_pallas_decode_kernel_matches_transformers(hf_model, hf_generate):
  """impl="pallas": pallas_kernels.mla_decode (on CPU, the TPU kernel in interpret mode)."""
  import pallas_kernels

  # Pallas' first interpret-mode trace imports modules that register config options, which changes the
  # tracing context once; warm it up so the helper's no-recompile check sees only our decode step.
  x = jnp.ones((1, 1, 8))
  pallas_kernels.mla_decode(x, x, x, x, jnp.ones((1,), jnp.int32), 1.0, impl="tpu", interpret=True)
  ref = hf_generate
  got = teacher_forced_logits(hf_model, hf_prompts(ref), ref["tokens"][:, :3], impl="pallas")
  np.testing.assert_allclose(got, ref["logits"][:, :4], atol=1e-4, rtol=0)


def test_greedy_batch_matches_transformers_generate(hf_model, hf_generate):
  """Prompts of lengths 1, 7, 12 batched together; transformers generated each alone and stopped on EOS (2)."""
  ref = hf_generate
  out = gen.generate(hf_model, hf_prompts(ref), max_new_tokens=ref["tokens"].shape[1], stop_tokens=(2,))
  for row, new in enumerate(out):
    want = [t for t in ref["tokens"][row].tolist() if t >= 0]
    assert new == (want[:-1] if want[-1] == 2 else want), row  # we do not emit the stop token


def cache_values_per_token_per_layer(cfg, kind):
  shapes = jax.eval_shape(lambda: gen.init_cache(cfg, batch=2, max_len=4096, kind=kind))
  total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  assert {a.shape[1:3] for a in jax.tree.leaves(shapes)} == {(2, 4096)}
  return total // (cfg.num_hidden_layers * 2 * 4096)


def test_cache_sizes_from_shapes():
  k2 = kimi_k2()
  assert cache_values_per_token_per_layer(k2, "latent") == 576
  assert cache_values_per_token_per_layer(k2, "expanded") == 64 * (192 + 128)
  cfg = HFCheckpoint(TINY_HF).config()
  assert cache_values_per_token_per_layer(cfg, "latent") == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 24
  k2_cache = jax.eval_shape(lambda: gen.init_cache(k2, batch=1, max_len=1, kind="latent"))
  assert jax.tree.map(lambda a: a.shape, k2_cache) == {
    "dense_layers": {"latent": (1, 1, 1, 512), "rope": (1, 1, 1, 64)},
    "moe_layers": {"latent": (60, 1, 1, 512), "rope": (60, 1, 1, 64)},
  }


def test_stop_tokens_and_streaming(hf_model, hf_generate):
  prompts = hf_prompts(hf_generate)
  free = gen.generate(hf_model, prompts, max_new_tokens=24)
  stop = free[0][5]
  steps = list(gen.stream(hf_model, prompts, max_new_tokens=24, stop_tokens=(stop, 2)))
  assert all(t.shape == (3,) and e.shape == (3,) and e.dtype == bool for t, e in steps)
  for row in range(3):
    emitted = [int(t[row]) for t, e in steps if e[row]]
    cut = min([free[row].index(s) for s in (stop, 2) if s in free[row]], default=24)
    assert emitted == free[row][:cut], row
    assert all(not e[row] for _, e in steps[cut:])  # a stopped row stays stopped
  assert len(steps) == 24  # row 2 never stops; stream ends after max_new_tokens
  seen = []
  gen.generate(hf_model, prompts, max_new_tokens=3, on_step=lambda t, e: seen.append(t.tolist()))
  assert seen == [[free[r][i] for r in range(3)] for i in range(3)]


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)

  def freqs(sampling):
    tokens = np.asarray(gen.sample_logits(logits, keys, sampling))
    return np.bincount(tokens, minlength=4) / len(tokens)

  np.testing.assert_array_equal(freqs(gen.Sampling()), [1, 0, 0, 0])
  np.testing.assert_array_equal(freqs(gen.Sampling(temperature=1.0, top_k=1)), [1, 0, 0, 0])
  np.testing.assert_allclose(freqs(gen.Sampling(temperature=1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.03)
  np.testing.assert_allclose(freqs(gen.Sampling(temperature=1.0, top_k=2)), [0.625, 0.375, 0, 0], atol=0.03)
  # top_p 0.7: 0.5 alone is short of 0.7, so 0.3 joins; 0.8 ≥ 0.7 stops there.
  np.testing.assert_allclose(freqs(gen.Sampling(temperature=1.0, top_p=0.7)), [0.625, 0.375, 0, 0], atol=0.03)
  np.testing.assert_allclose(
    freqs(gen.Sampling(temperature=1.0, top_k=3, top_p=0.95)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.03
  )
  hot = freqs(gen.Sampling(temperature=100.0))
  assert hot.min() > 0.2  # near uniform
  with pytest.raises(ValueError, match="top_p"):
    gen.Sampling(top_p=0)


def test_seeded_sampling_is_reproducible(hf_model, hf_generate):
  prompts = hf_prompts(hf_generate)
  options = dict(max_new_tokens=8, sampling=gen.Sampling(temperature=1.0, top_p=0.9), seed=11)
  first = gen.generate(hf_model, prompts, **options)
  assert first == gen.generate(hf_model, prompts, **options)
  assert first != gen.generate(hf_model, prompts, **{**options, "seed": 12})


@pytest.mark.parametrize(
  "prompts, kwargs, message",
  [
    ([], {}, "no prompts"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 300]], {}, r"token id 300 at position \(0, 1\) is outside the vocabulary \[0, 256\)"),
    ([[1, -3]], {}, "token id -3"),
    ([list(range(10))], {"max_len": 12}, r"prompt 0 has 10 tokens; .* needs a cache of 14 > 12"),
    ([[1]], {"max_len": 200_000}, "max_position_embeddings"),
  ],
)
def test_bad_input_is_explained(hf_model, prompts, kwargs, message):
  with pytest.raises(ValueError, match=message):
    gen.generate(hf_model, prompts, max_new_tokens=4, **kwargs)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  from kimi_jax.checkpoint.convert import hf_to_orbax

  out = str(tmp_path_factory.mktemp("orbax") / "hf_fixture")
  hf_to_orbax(str(TINY_HF), out)
  return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_model):
  """The random `tiny` model (vocab 512: bytes, then BOS 256 / EOS 257) and a 256-rank tiktoken file."""
  from kimi_jax.checkpoint.model_io import save_model

  out = tmp_path_factory.mktemp("tiny")
  save_model(str(out / "ckpt"), tiny_model.cfg, nnx.state(tiny_model, nnx.Variable).to_pure_dict())
  ranks = out / "tiktoken.model"
  ranks.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
  return str(out / "ckpt"), str(ranks)


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "kimi_jax.generate", *args],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=300,
  )


@pytest.mark.slow
def test_cli_tokens_on_the_converted_fixture(converted, hf_generate, tmp_path):
  prompts = tmp_path / "prompts.npy"
  np.save(prompts, hf_generate["prompts"])  # [3, 12], rows right-padded with -1
  out = tmp_path / "out.npy"
  result = run_cli(
    "--checkpoint",
    converted,
    "--prompt_tokens",
    str(prompts),
    "--max_new_tokens",
    "24",
    "--dtype",
    "float32",
    "--out",
    str(out),
  )
  assert result.returncode == 0, result.stderr
  got = np.load(out)
  for row, want in enumerate(hf_generate["tokens"]):  # the fixture's EOS (2) is the default stop token
    want = [t for t in want.tolist() if t >= 0]
    assert [t for t in got[row].tolist() if t >= 0] == (want[:-1] if want[-1] == 2 else want), row
  assert "tokens/s" in result.stdout


@pytest.mark.slow
def test_cli_text_and_chat(tiny_checkpoint, tiny_greedy):
  ckpt, ranks = tiny_checkpoint
  result = run_cli(
    "--checkpoint",
    ckpt,
    "--prompt",
    "Hi",
    "--max_new_tokens",
    "6",
    "--temperature",
    "0.7",
    "--top_k",
    "20",
    "--top_p",
    "0.9",
    "--cache",
    "expanded",
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Hi") and "tokens/s" in result.stdout
  result = run_cli("--checkpoint", ckpt, "--tokenizer", ranks, "--chat", "--prompt", "Hi", "--max_new_tokens", "4")
  assert result.returncode == 0, result.stderr
  prompt_tokens = int(result.stdout.split("prefill: ")[1].split()[0])
  assert prompt_tokens > 60  # the default system turn and the user turn, not just "Hi"


@pytest.mark.slow
def test_cli_errors_are_clear(tiny_checkpoint, tmp_path):
  ckpt, _ = tiny_checkpoint
  empty = tmp_path / "empty.npy"
  np.save(empty, np.full((1, 4), -1, np.int32))
  result = run_cli("--checkpoint", ckpt, "--prompt_tokens", str(empty), "--max_new_tokens", "2")
  assert result.returncode != 0 and "prompt 0 is empty" in result.stderr
  result = run_cli("--checkpoint", ckpt, "--prompt", "x" * 40, "--max_new_tokens", "2", "--max_len", "16")
  assert result.returncode != 0 and "needs a cache of 43 > 16" in result.stderr
  result = run_cli("--checkpoint", ckpt, "--prompt", "x", "--chat")
  assert result.returncode != 0 and "--chat needs Kimi's tiktoken tokenizer" in result.stderr


# Chunked decoding ---------------------------------------------------------------------------------------------


def stepwise(model, prompts, *, max_new_tokens, sampling=None, stop_tokens=(), seed=0, max_len=None):
  """The loop `stream` runs, one `decode_step` dispatch per token: the same key splits and draws per step.

  Returns [(tokens [B], emitted [B])] per step.
  """
  tokens, lengths, max_len = gen.pack_prompts(prompts, model.cfg, max_new_tokens, max_len)
  logits, state = gen.prefill(model, tokens, lengths, max_len=max_len)
  key, done, steps = jax.random.key(seed), np.zeros(len(prompts), bool), []
  for i in range(max_new_tokens):
    key, sub = jax.random.split(key)
    new = np.asarray(gen.sample_logits(logits, sub, sampling or gen.Sampling()))
    done = done | np.isin(new, stop_tokens)
    steps.append((new, ~done))
    if done.all() or i + 1 == max_new_tokens:
      return steps
    logits, state = gen.decode_step(model, state, new, impl="xla")


def assert_same_steps(got, want):
  assert len(got) == len(want)
  for i, ((tokens, emitted), (want_tokens, want_emitted)) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(tokens, want_tokens, err_msg=f"step {i}")
    np.testing.assert_array_equal(emitted, want_emitted, err_msg=f"step {i}")


@pytest.fixture
def small_windows(monkeypatch):
  """Attention windows of 8 · 2^k: short generations cross several windows, each written back into the cache."""
  monkeypatch.setattr(gen, "WINDOW_BUCKET", 8)


@pytest.mark.parametrize("chunk", [1, 3, gen.DECODE_CHUNK])
def test_chunked_loop_equals_the_step_loop(hf_model, hf_generate, small_windows, chunk):
  """Greedy, rows of 1, 7 and 12 prompt tokens stopping at different steps, mid-chunk (stop tokens taken from the
  free run), and a run that ends early when every row has stopped."""
  prompts = hf_prompts(hf_generate)
  free = stepwise(hf_model, prompts, max_new_tokens=20)
  stops = (int(free[4][0][0]), int(free[9][0][1]), int(free[13][0][2]))
  for options in (
    {"max_new_tokens": 20},
    {"max_new_tokens": 19, "stop_tokens": stops[:2]},
    {"max_new_tokens": 20, "stop_tokens": stops},
  ):
    want = stepwise(hf_model, prompts, **options)
    assert_same_steps(list(gen.stream(hf_model, prompts, chunk=chunk, **options)), want)
  assert len(want) < 20 and not want[-1][1].any()  # the last case ended early


def test_chunked_sampling_equals_the_step_loop(hf_model, hf_generate, small_windows):
  prompts = hf_prompts(hf_generate)
  sampling = gen.Sampling(temperature=1.0, top_k=50, top_p=0.9)
  options = dict(max_new_tokens=17, sampling=sampling, stop_tokens=(2, 7), seed=5)
  want = stepwise(hf_model, prompts, **options)
  assert_same_steps(list(gen.stream(hf_model, prompts, chunk=4, **options)), want)


def test_attention_window():
  assert [gen.attention_window(n, 1024) for n in (1, 128, 129, 256, 257, 900)] == [128, 128, 256, 256, 512, 1024]
  assert gen.attention_window(300, 384) == 384  # capped at the cache length


def test_no_recompiles_across_prompt_lengths_within_a_bucket(hf_model):
  """Prompts of 2 to 30 tokens (one prompt bucket, one cache length, one attention window) and other stop tokens
  (of the same count) share every compile."""
  jitted = (gen._prefill, gen._first, gen._decode_chunk)
  gen.generate(hf_model, [[5] * 5, [6] * 3], max_new_tokens=20, stop_tokens=(4,))
  sizes = [f._cache_size() for f in jitted]
  gen.generate(hf_model, [[7] * 9, [8] * 2], max_new_tokens=20, stop_tokens=(5,))
  gen.generate(hf_model, [[9] * 30, [8] * 12], max_new_tokens=18, stop_tokens=(3,))
  assert [f._cache_size() for f in jitted] == sizes
