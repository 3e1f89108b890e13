"""Generation: prefill, then decoding in chunks of steps, each chunk one jit-compiled loop; sampling; streaming.

    python -m kimi_jax.generate --checkpoint DIR --prompt "In the beginning" --max_new_tokens 64
    python -m kimi_jax.generate --checkpoint DIR --tokenizer tiktoken.model --chat --prompt "Hi" --temperature 0.6
    python -m kimi_jax.generate --checkpoint DIR --prompt_tokens P.npy --max_new_tokens 16 --out OUT.npy
    python -m kimi_jax.generate --checkpoint DIR --prompt "In the beginning" --mesh fsdp=2,expert=4

Letters: B batch, S prompt buffer length, T cache length, W attention window, K steps per chunk, V vocab,
L stacked layers, D model.

Batching: prompts are **right-padded** into one [B, S] buffer. Row b holds its n_b prompt tokens at positions
0..n_b-1, and its cache holds n_b valid entries; every decode step writes each row's new entry at its own
position `lengths[b]` and attends to the first `lengths[b] + 1` entries. Cache buffers have a fixed size
[L, B, T, ...] and lengths are data, so one compiled step serves every row and every step.

Decoding runs in chunks (`_decode_chunk`): one dispatch runs up to K = DECODE_CHUNK steps inside a
`lax.while_loop` (decode step, sampling and stop-token bookkeeping fused), ending early once every row has stopped,
and returns the chunk's tokens [K, B] and emitted flags. The host dispatches chunk i+1 before it reads chunk i
back. A chunk's attention reads only the cache's first W positions: W is the smallest WINDOW_BUCKET · 2^k
(capped at T) covering every position the chunk can reach, so a short generation does not pay for the whole
allocated cache, and the few window sizes are each compiled once, whatever the prompt lengths.

Prefill and decode are the model's own forward with a cache (`KimiK2.__call__`); this file holds the loop around
it. Cache kinds (`kimi_jax.layers.cache`): "latent" (default; the normalised latent and the rope key,
kv_lora_rank + qk_rope_head_dim values per token per layer, decoded with absorbed weights) and "expanded"
(per-head k and v; the baseline for `benchmarks/generate.py`).

Mesh (`mesh=` of `stream`, `--mesh`): the model's variables are placed on it (`sharding.shard_model`), the batch
and the cache's B are split over its batch shards, and any number of prompts runs: the batch is padded to a
multiple of the batch shards with copies of row 0 (`sharding.padded_batch`), which never reach the output and
never change a real row's draws (sampling sees the real rows only; padding rows are fed row 0's tokens).

The CLI encodes `--prompt` with `--tokenizer` (byte-level by default, or Kimi's tiktoken.model), optionally as
one user turn of Kimi's chat template (`--chat`), streams the text, and reports prefill time and decode tokens/s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import functools
import sys
import time
from typing import NamedTuple

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from kimi_jax import backend, cli_flags, sharding  # noqa: F401 (cli_flags: the shared flags)
from kimi_jax.config import ModelConfig
from kimi_jax.layers.cache import CACHE_KINDS, Cache
from kimi_jax.model import KimiK2, check_tokens, init_cache

PROMPT_BUCKET = 64  # prompt buffers are padded to a multiple of this, so similar prompts share one compile
CACHE_BUCKET = 256  # the default cache length is rounded up to a multiple of this
DECODE_CHUNK = 32  # K: decode steps per dispatch (at most)
WINDOW_BUCKET = 128  # attention windows W are this times a power of two (or T)


class DecodeState(NamedTuple):
  cache: Cache  # {layer group: {name: [L, B, T, ...]}}
  lengths: jax.Array  # [B] int32: valid cache entries per row = the position of the row's next token


class Loop(NamedTuple):
  """What the sampling loop carries from step to step (B' rows: B real ones and the mesh's batch padding)."""

  state: DecodeState  # [B'] rows
  new: jax.Array  # [B'] int32: the tokens to feed next (the last ones sampled)
  done: jax.Array  # [B] bool: the row has met a stop token
  key: jax.Array  # the PRNG key of the next draw


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


# Prefill and decode -------------------------------------------------------------------------------------------


def prefill(
  model: KimiK2, tokens: jax.Array, lengths: jax.Array, *, max_len: int, kind: str = "latent"
) -> tuple[jax.Array, DecodeState]:
  """Full forward over right-padded prompts that also fills a new cache (`init_cache`) of length `max_len`.

  tokens: [B, S] int (row b valid in [0, lengths[b])); lengths: [B] int32, 1 ≤ lengths ≤ S ≤ max_len.
  Returns the logits at each row's last prompt token [B, V] float32 and the decode state.
  """
  if tokens.shape[1] > max_len:
    raise ValueError(f"prompt buffer of {tokens.shape[1]} tokens does not fit a cache of max_len={max_len}")
  graphdef, state = nnx.split(model)
  return _prefill(
    graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), max_len=max_len, kind=kind
  )


def decode_step(
  model: KimiK2, state: DecodeState, tokens: jax.Array, *, impl: str = "auto"
) -> tuple[jax.Array, DecodeState]:
  """Feed one token per row at position state.lengths[b]. tokens: [B] int -> (logits [B, V] f32, new state).

  impl: decode attention, "xla" | "pallas" | "auto" (see `attention.latent_attention`). `state` is donated.
  """
  graphdef, params = nnx.split(model)
  return _decode(graphdef, params, state, jnp.asarray(tokens, jnp.int32), impl=backend.resolve("attention", impl))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "kind"))
def _prefill(graphdef, params, tokens, lengths, *, max_len, kind):
  model = nnx.merge(graphdef, params)
  b, s = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # 0 marks padding
  x, aux = model.features(
    tokens, positions=positions, segment_ids=segment_ids, cache=init_cache(model.cfg, b, max_len, kind)
  )
  return model.logits(x[jnp.arange(b), lengths - 1]), DecodeState(aux["cache"], lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"), donate_argnames=("state",))
def _decode(graphdef, params, state, tokens, *, impl):
  model = nnx.merge(graphdef, params)
  x, aux = model.features(tokens[:, None], positions=state.lengths[:, None], cache=state.cache, attention_impl=impl)
  return model.logits(x[:, 0]), DecodeState(aux["cache"], state.lengths + 1)


# Sampling -----------------------------------------------------------------------------------------------------


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """logits: [B, V] float32 -> tokens [B] int32: greedy, or temperature then top-k then top-p (nucleus)."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    ordered = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p  # mass before a token < top_p; first always kept
    threshold = jnp.take_along_axis(ordered, keep.sum(-1, keepdims=True) - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _pick(logits, done, key, stop_tokens, *, sampling):
  """Sample, then mark rows done on a stop token. logits: [B', V], rows past B = len(done) being batch padding;
  stop_tokens: [N] int32.

  Only the B real rows are sampled, so the draws are those of an unpadded batch. Returns (tokens [B'] to feed the
  next step, padding rows repeating row 0's token as `sharding.pad_batch` does; done [B]; key).
  """
  key, sub = jax.random.split(key)
  tokens = sample_logits(sharding.unpad_batch(logits, done.shape[0]), sub, sampling)
  done = done | jnp.isin(tokens, stop_tokens)
  return sharding.pad_batch(tokens, logits.shape[0]), done, key


@functools.partial(jax.jit, static_argnames=("rows", "sampling"), donate_argnames=("state",))
def _first(logits, state, seed, stop_tokens, *, rows, sampling):
  """The first token after the prefill: logits [B', V] -> the Loop that `_decode_chunk` continues."""
  new, done, key = _pick(logits, jnp.zeros(rows, bool), jax.random.key(seed), stop_tokens, sampling=sampling)
  return Loop(state, new, done, key)


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "impl", "sampling", "chunk", "window"),
  donate_argnames=("loop",),
)
def _decode_chunk(graphdef, params, loop, steps, stop_tokens, *, impl, sampling, chunk, window):
  """Up to `steps` (≤ chunk = K) decode steps, each sampling the next tokens; stops early once every row is done.
  stop_tokens: [N] int32.

  Attention reads the cache's first `window` = W positions only: W must cover every position the steps reach,
  max(lengths) + steps. Returns (the loop after the steps, tokens [K, B] int32 and emitted [K, B] bool per step,
  the steps run [] int32); entries past the steps run are zeros.
  """
  model = nnx.merge(graphdef, params)
  full = loop.state.cache
  cache = jax.tree.map(lambda a: a[:, :, :window], full)  # [L, B', W, ...]
  rows = loop.done.shape[0]

  def cond(carry):
    i, lp, _, _ = carry
    return (i < steps) & ~lp.done.all()

  def body(carry):
    i, lp, tokens, emitted = carry
    state = lp.state
    x, aux = model.features(lp.new[:, None], positions=state.lengths[:, None], cache=state.cache, attention_impl=impl)
    new, done, key = _pick(model.logits(x[:, 0]), lp.done, lp.key, stop_tokens, sampling=sampling)
    tokens = tokens.at[i].set(new[:rows])
    emitted = emitted.at[i].set(~done)
    return i + 1, Loop(DecodeState(aux["cache"], state.lengths + 1), new, done, key), tokens, emitted

  carry = (
    jnp.zeros((), jnp.int32),
    loop._replace(state=DecodeState(cache, loop.state.lengths)),
    jnp.zeros((chunk, rows), jnp.int32),
    jnp.zeros((chunk, rows), bool),
  )
  count, loop, tokens, emitted = jax.lax.while_loop(cond, body, carry)
  if window < next(iter(jax.tree.leaves(full))).shape[2]:
    cache = jax.tree.map(lambda a, w: jax.lax.dynamic_update_slice_in_dim(a, w, 0, axis=2), full, loop.state.cache)
    loop = loop._replace(state=loop.state._replace(cache=cache))
  return loop, tokens, emitted, count


def attention_window(reach: int, max_len: int) -> int:
  """The attention window W for a chunk whose steps reach `reach` cache positions: WINDOW_BUCKET · 2^k ≥ reach,
  capped at the cache length T = max_len."""
  window = WINDOW_BUCKET
  while window < reach:
    window *= 2
  return min(window, max_len)


# The generation loop ------------------------------------------------------------------------------------------


def stream(
  model: KimiK2,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  sampling: Sampling = Sampling(),
  stop_tokens: Sequence[int] = (),
  seed: int = 0,
  max_len: int | None = None,
  cache_kind: str = "latent",
  attention_impl: str = "auto",
  mesh: Mesh | None = None,
  chunk: int = DECODE_CHUNK,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Generate for a batch of prompts of any lengths; yields after every step.

  Yields (tokens [B] int32, emitted [B] bool): row b produced tokens[b] if emitted[b]. A row stops at its first
  stop token, which is not emitted; the loop ends when every row has stopped or after max_new_tokens steps.
  max_len: cache length T (default: longest prompt + max_new_tokens, rounded up to CACHE_BUCKET and capped at
  max_position_embeddings). attention_impl: decode attention, see `decode_step`.
  mesh: run sharded over it, the model's variables already placed there (`sharding.shard_model`); the batch is
  padded to its batch shards (module docstring).
  chunk: K, the decode steps per dispatch; the steps of a chunk are yielded one after another once it is back.
  Chunk i+1 is dispatched before chunk i is read back, so the host never idles the device (except when chunk i+1
  needs a wider attention window: then it is dispatched only if the generation goes on, never compiled for nothing).
  """
  tokens, lengths, max_len = pack_prompts(prompts, model.cfg, max_new_tokens, max_len)
  if max_new_tokens <= 0:
    return
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  rows, longest = len(prompts), int(lengths.max())
  tokens, lengths = sharding.pad_batch(
    (tokens, lengths), sharding.padded_batch(rows, mesh, model.cfg.moe_capacity_factor)
  )
  on_mesh = contextlib.nullcontext
  if mesh is not None:
    tokens, lengths = jax.device_put(
      (tokens, lengths), (sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1))
    )
    on_mesh = functools.partial(sharding.use_mesh, mesh)  # entered per dispatch, never across a yield
  graphdef, params = nnx.split(model)
  stops = np.asarray([int(t) for t in stop_tokens], np.int32)  # data, not a compile-time constant
  impl = backend.resolve("attention", attention_impl)
  decode = functools.partial(_decode_chunk, graphdef, params, impl=impl, sampling=sampling, chunk=chunk)
  with on_mesh():
    logits, state = _prefill(graphdef, params, tokens, lengths, max_len=max_len, kind=cache_kind)
    loop = _first(logits, state, seed, stops, rows=rows, sampling=sampling)
  first_new, first_done = sharding.unpad_batch(np.asarray(loop.new), rows), np.asarray(loop.done)
  yield first_new, ~first_done
  if max_new_tokens == 1 or first_done.all():
    return

  def dispatch(loop, start):
    """Chunk of decode steps start..: (steps, window, outputs) with outputs (loop, tokens, emitted, count)."""
    steps = min(chunk, max_new_tokens - 1 - start)
    window = attention_window(longest + start + steps, max_len)  # lengths ≤ longest + start before the chunk
    with on_mesh():
      return steps, window, decode(loop, np.int32(steps), stops, window=window)

  start, pending = 0, dispatch(loop, 0)
  while pending is not None:
    steps, window, (loop, chunk_tokens, chunk_emitted, count) = pending
    start += steps
    pending = None
    more = start < max_new_tokens - 1
    if more and attention_window(longest + start + min(chunk, max_new_tokens - 1 - start), max_len) == window:
      pending = dispatch(loop, start)  # before reading this chunk back
    chunk_tokens, chunk_emitted, count = np.asarray(chunk_tokens), np.asarray(chunk_emitted), int(count)
    for i in range(count):
      yield chunk_tokens[i], chunk_emitted[i]
    if count < steps or not chunk_emitted[count - 1].any():
      return  # every row has stopped (a chunk dispatched ahead runs no step)
    if more and pending is None:
      pending = dispatch(loop, start)


def generate(
  model: KimiK2,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  on_step: Callable[[np.ndarray, np.ndarray], None] | None = None,
  **options,
) -> list[list[int]]:
  """Like `stream` (same options), but returns each row's new tokens; `on_step(tokens, emitted)` sees each step."""
  out = [[] for _ in prompts]
  for new, emitted in stream(model, prompts, max_new_tokens=max_new_tokens, **options):
    if on_step is not None:
      on_step(new, emitted)
    for row in np.flatnonzero(emitted):
      out[row].append(int(new[row]))
  return out


def sample(
  model: KimiK2,
  prompt: list[int],
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  seed: int = 0,
  stop_token: int | None = None,
) -> list[int]:
  """Continue one prompt by up to `max_new_tokens` tokens (greedy when temperature == 0); stops before
  `stop_token`. Returns the new tokens."""
  stop = () if stop_token is None else (stop_token,)
  return generate(
    model,
    [prompt],
    max_new_tokens=max_new_tokens,
    sampling=Sampling(temperature=temperature),
    stop_tokens=stop,
    seed=seed,
  )[0]


def pack_prompts(
  prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
  """Checks prompts and right-pads them for `prefill`: (tokens [B, S] int32, lengths [B] int32, cache length T).

  S is the longest prompt rounded up to PROMPT_BUCKET (at most T); T is `max_len` or the default of `stream`.
  """
  if len(prompts) == 0:
    raise ValueError("no prompts given")
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if (lengths == 0).any():
    raise ValueError(f"prompt {int(np.argmin(lengths))} is empty; every prompt needs at least one token")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  longest = int(lengths.max())
  limit = cfg.max_position_embeddings
  if max_len is None:
    max_len = min(-(-(longest + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET, limit)
  if max_len > limit:
    raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings={limit}")
  if longest + max_new_tokens > max_len:
    row = int(np.argmax(lengths))
    raise ValueError(
      f"prompt {row} has {longest} tokens; with max_new_tokens={max_new_tokens} it needs a cache of "
      f"{longest + max_new_tokens} > {max_len} positions (max_len / max_position_embeddings)"
    )
  width = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, max_len)
  tokens = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    check_tokens(ids[None], cfg)
    tokens[row, : len(ids)] = ids
  return tokens, lengths, max_len


# CLI ----------------------------------------------------------------------------------------------------------


def _read_prompt_tokens(path: str) -> list[list[int]]:
  """P.npy: int [S] (one prompt) or [B, S] with shorter rows right-padded with -1."""
  arr = np.load(path)
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{path}: expected an integer array [S] or [B, S], got {arr.dtype} {arr.shape}")
  prompts = []
  for row in arr:
    n = len(row)
    while n and row[n - 1] == -1:
      n -= 1
    prompts.append(row[:n].tolist())
  return prompts


# Flags (`python -m kimi_jax.generate`); shared: --checkpoint, --tokenizer, --dtype, --moe_impl, --mesh and --out
# (generated ids, .npy int32 [B, N] padded with -1), see kimi_jax/cli_flags.py.
flags.DEFINE_string("prompt", None, "Prompt text, encoded with --tokenizer after its BOS id.")
flags.DEFINE_bool(
  "chat",
  False,
  "Wrap --prompt as one user turn of Kimi's chat template (needs a Kimi tiktoken --tokenizer); also stops on "
  "<|im_end|>.",
)
flags.DEFINE_string("prompt_tokens", None, "Prompt ids, .npy int [S] or [B, S] (shorter rows padded with -1).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
flags.DEFINE_list("stop_tokens", None, "Stop token ids (default: the model's EOS id, and <|im_end|> with --chat).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("max_len", None, "Cache length (default: longest prompt + max_new_tokens, rounded up).")
flags.DEFINE_enum("cache", "latent", list(CACHE_KINDS), "KV cache layout.")
flags.DEFINE_enum("attention_impl", "auto", ["auto", *backend.CHOICES["attention"]], "Decode attention implementation.")


def _cli_prompts(f, cfg: ModelConfig):
  """(prompts, stop ids, tokenizer or None for --prompt_tokens) from the flags."""
  from kimi_jax.data.tokenizer import KimiTokenizer, load_tokenizer

  if (f.prompt is None) == (f.prompt_tokens is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_tokens")
  stops = [cfg.eos_token_id]
  if f.prompt_tokens is not None:
    if f.chat:
      raise app.UsageError("--chat applies to --prompt text")
    return _read_prompt_tokens(f.prompt_tokens), stops, None
  tokenizer = load_tokenizer(f.tokenizer)
  if not f.chat:
    return [tokenizer.encode(f.prompt, add_bos=True)], stops, tokenizer
  if not isinstance(tokenizer, KimiTokenizer):
    raise app.UsageError("--chat needs Kimi's tiktoken tokenizer: pass --tokenizer PATH/tiktoken.model")
  from kimi_jax.data.chat import STOP_TOKEN, encode_chat

  prompt = encode_chat(tokenizer, [{"role": "user", "content": f.prompt}])
  return [prompt], stops + [tokenizer.special_id(STOP_TOKEN)], tokenizer


class _TextStream:
  """Prints `prefix`, then row 0's new text as it arrives, holding back a possibly incomplete UTF-8 character."""

  def __init__(self, tokenizer, prefix: str):
    self.tokenizer, self.prefix, self.ids, self.shown = tokenizer, prefix, [], 0

  def __call__(self, new: np.ndarray, emitted: np.ndarray) -> None:
    print(self.prefix, end="", flush=True)
    self.prefix = ""
    if emitted[0]:
      self.ids.append(int(new[0]))
      self._show(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

  def close(self) -> None:
    self._show(self.tokenizer.decode(self.ids))
    print(flush=True)

  def _show(self, text: str) -> None:
    print(text[self.shown :], end="", flush=True)
    self.shown = max(self.shown, len(text))


def main(argv):
  del argv
  from kimi_jax.checkpoint.model_io import load_any

  f = flags.FLAGS
  runtime = {k: v for k, v in (("dtype", f.dtype), ("param_dtype", f.dtype), ("moe_impl", f.moe_impl)) if v}
  try:
    mesh = sharding.make_mesh(f.mesh) if f.mesh else None
  except ValueError as e:
    sys.exit(f"error: {e}")
  if mesh is not None:
    runtime["moe_capacity_factor"] = None  # dropless: see sharding.padded_batch
  cfg, model = load_any(f.checkpoint, **runtime)
  try:  # bad prompts, token ids or options: a one-line error, before any compute
    prompts, stops, tokenizer = _cli_prompts(f, cfg)
    pack_prompts(prompts, cfg, f.max_new_tokens, f.max_len)
    sampling = Sampling(f.temperature, f.top_k, f.top_p)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if mesh is not None:
    sharding.shard_model(model, mesh)
  if f.stop_tokens is not None:
    stops = [int(t) for t in f.stop_tokens]
  text = _TextStream(tokenizer, "" if f.chat else f.prompt) if tokenizer is not None else None
  times = []

  def on_step(new, emitted):
    times.append(time.perf_counter())
    if text is not None:
      text(new, emitted)

  start = time.perf_counter()
  out = generate(
    model,
    prompts,
    max_new_tokens=f.max_new_tokens,
    on_step=on_step,
    sampling=sampling,
    stop_tokens=stops,
    seed=f.seed,
    max_len=f.max_len,
    cache_kind=f.cache,
    attention_impl=f.attention_impl,
    mesh=mesh,
  )
  if text is not None:
    text.close()
  else:
    for row, new in enumerate(out):
      print(f"[{row}] {new}")
  if f.out:
    width = max(len(new) for new in out)
    np.save(f.out, np.asarray([new + [-1] * (width - len(new)) for new in out], np.int32).reshape(len(out), width))
    print(f"wrote generated ids [{len(out)}, {width}] (-1 pads) to {f.out}")
  if times:
    print(
      f"prefill: {sum(map(len, prompts))} prompt tokens and the first new token in {times[0] - start:.2f}s "
      f"(includes compiling)"
    )
  if len(times) > 1:
    steps, seconds = len(times) - 1, times[-1] - times[0]
    print(
      f"decode: {steps} steps x {len(prompts)} rows in {seconds:.2f}s = {steps * len(prompts) / seconds:.1f} tokens/s"
    )


if __name__ == "__main__":
  flags.mark_flag_as_required("checkpoint")
  app.run(main)
