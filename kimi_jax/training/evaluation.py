"""Held-out evaluation: the model's loss and perplexity on fixed batches, with the training mesh and shardings.

Where the documents come from (`split_sources`):
  config.eval_split = f > 0   every round(1/f)-th document of config.data is held out (data.sources.HeldOut);
                              training never sees those, whether or not it evaluates
  config.eval_data = SOURCE   a separate source, in any form config.data takes

`eval_batches` packs `config.eval_batches` global batches of batch_size × seq_len from those documents once, with the
training pipeline and a fixed seed, over `config.data_shards` streams as training does (so the same rows whatever the
process count), and keeps them on the host. Every evaluation (`Evaluator`) scores exactly those tokens with one
jit-compiled forward step (training.step.make_eval_step): the same numbers on a rerun and after a resume, comparable
across the run. eval_loss is the mean NLL over all their masked tokens, eval_perplexity its exp.
"""

from __future__ import annotations

import functools
import math

import jax
import ml_collections
import numpy as np

from kimi_jax import sharding
from kimi_jax.data.batch import Batch
from kimi_jax.data.pipeline import ShardedBatches
from kimi_jax.data.sources import DocumentSource, HeldOut, open_source
from kimi_jax.data.tokenizer import Tokenizer
from kimi_jax.training.state import TrainState
from kimi_jax.training.step import make_eval_step


def check_eval_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when the eval settings contradict each other."""
  if c.eval_every < 0 or c.eval_batches < 1:
    raise ValueError(
      f"config.eval_every must be >= 0 and config.eval_batches >= 1, got {c.eval_every}, {c.eval_batches}"
    )
  if not 0.0 <= c.eval_split <= 0.5:
    raise ValueError(f"config.eval_split is the share of documents held out, in [0, 0.5]; got {c.eval_split}")
  if c.eval_split and c.eval_data:
    raise ValueError("give config.eval_split (hold out part of config.data) or config.eval_data, not both")
  if c.eval_every and not (c.eval_split or c.eval_data):
    raise ValueError(
      f"config.eval_every={c.eval_every} needs documents to evaluate on: set config.eval_split (e.g. 0.01, held out "
      "from config.data) or config.eval_data"
    )


def split_sources(c: ml_collections.ConfigDict, tokenizer: Tokenizer) -> tuple[DocumentSource, DocumentSource | None]:
  """(training documents, held-out documents or None) per config.data, eval_split and eval_data."""
  check_eval_config(c)
  data = open_source(c.data, tokenizer, text_field=c.text_field)
  if c.eval_split:
    period = round(1 / c.eval_split)
    held_out = HeldOut(data, period=period, held_out=True)
    if not len(held_out):
      raise ValueError(f"config.eval_split={c.eval_split} holds out none of the {len(data)} documents of {c.data!r}")
    return HeldOut(data, period=period, held_out=False), held_out
  if c.eval_data:
    return data, open_source(c.eval_data, tokenizer, text_field=c.text_field)
  return data, None


def batch_stream(c: ml_collections.ConfigDict, source: DocumentSource, tokenizer: Tokenizer) -> ShardedBatches:
  """This process's rows of the run's global batches (c.batch_size × c.seq_len, seed c.seed) packed from `source` over
  c.data_shards streams (0: one per process): what training reads from its documents and evaluation from its own."""
  return ShardedBatches(
    num_shards=c.data_shards or jax.process_count(),
    global_batch_size=c.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    tokenizer=tokenizer,
    source=source,
    seq_len=c.seq_len,
    seed=c.seed,
  )


def eval_batches(c: ml_collections.ConfigDict, source: DocumentSource, tokenizer: Tokenizer) -> list[Batch]:
  """This process's rows of the `c.eval_batches` fixed global batches packed from `source` (numpy, each field
  [batch_size / process_count, seq_len]), over `c.data_shards` streams as training reads its data."""
  num_shards = c.data_shards or jax.process_count()
  if len(source) < num_shards:
    raise ValueError(
      f"the evaluation documents ({len(source)}) are fewer than the data streams ({num_shards}): hold out more "
      "(config.eval_split) or give a larger config.eval_data"
    )
  stream = batch_stream(c, source, tokenizer)
  return [next(stream) for _ in range(c.eval_batches)]


class Evaluator:
  """evaluator(state) -> {"eval_loss", "eval_perplexity", "eval_tokens"} on fixed batches (`eval_batches`)."""

  def __init__(self, c: ml_collections.ConfigDict, graphdef, batches: list[Batch], mesh: jax.sharding.Mesh):
    self.batches = batches
    self.step = make_eval_step(graphdef, c)
    self._mesh = mesh
    self._to_global = functools.partial(jax.make_array_from_process_local_data, sharding.batch_sharding(mesh))

  def __call__(self, state: TrainState) -> dict[str, float]:
    with sharding.use_mesh(self._mesh):
      sums = [self.step(state.params, state.rest, jax.tree.map(self._to_global, b)) for b in self.batches]
    nll, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)  # one transfer, summed in float64
    loss = nll / max(count, 1.0)
    return {
      "eval_loss": float(loss),
      "eval_perplexity": math.exp(loss) if loss < 700 else math.inf,  # exp overflows a float past ~709
      "eval_tokens": int(count),
    }
