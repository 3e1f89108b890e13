"""The loss and the jit-compiled steps: `make_train_step` (loss → grads → optimizer → router-bias update, with the
step's finite flags) and `make_eval_step` (the same loss, forward only).

Per train step: `Batch` (kimi_jax/data/batch.py: inputs, targets, segment_ids, positions, loss_mask, all [B, S]) →
model → final-norm features [B, S, D] → masked next-token cross-entropy over chunks of the logits [B, S, V] f32 →
grads w.r.t. the Params → optimizer → new Params; expert loads [L, E] from the forward pass → router biases.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from kimi_jax.data.batch import Batch
from kimi_jax.model import LAYER_GROUPS, lm_logits
from kimi_jax.training.optimizer import qk_clip_tau
from kimi_jax.training.state import TrainState, router_biases, with_router_biases

# config.on_nonfinite: what a step with a NaN/inf loss or gradient norm does.
NONFINITE_ACTIONS = ("stop", "skip")
# The step's metrics that carry its finite flags (read by the loop, never logged).
FINITE_KEY = "_finite"
GRAD_LEAF_FINITE_KEY = "_grad_leaf_finite"  # [number of param leaves] bool, in tree_leaves(params) order


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits: [B, S, V] f32; targets: [B, S] int; mask: [B, S] -> (sum of masked NLL, number of masked tokens)."""
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_cross_entropy(
  x: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy(lm_logits(x, head), targets, mask)` with the logits made `chunk` positions at a time.

  x: [B, S, D] final-norm output; head: [D, V]; targets, mask: [B, S]; chunk: positions per piece (0 or >= S:
  one piece). Each piece's f32 logits [B, chunk, V] are recomputed in the backward pass instead of stored: for
  K2's 163,840-word vocabulary the whole [B, S, V] is 21 GB per 32K tokens, two or three times over with its
  gradient.
  """
  b, s, _ = x.shape
  if not chunk or chunk >= s:
    return cross_entropy(lm_logits(x, head), targets, mask)
  if s % chunk:
    raise ValueError(f"config.loss_chunk={chunk} does not divide seq_len={s}")
  pieces = lambda a: jnp.moveaxis(a.reshape((b, s // chunk, chunk) + a.shape[2:]), 1, 0)  # [S/chunk, B, chunk, ...]

  @jax.checkpoint
  def body(total, piece):
    x_piece, targets_piece, mask_piece = piece
    return total + cross_entropy(lm_logits(x_piece, head), targets_piece, mask_piece)[0], None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (pieces(x), pieces(targets), pieces(mask)))
  return total, jnp.sum(mask)


def sum_nll(
  graphdef: nnx.GraphDef, params: dict, rest: dict, batch: Batch, loss_chunk: int
) -> tuple[jax.Array, jax.Array, dict]:
  """(sum of the masked next-token NLL, number of masked tokens, the forward pass's aux) of `batch` [B, S] under the
  model (graphdef, params, rest). aux: max_logits per layer group, and the expert loads [L, E] of an MoE model."""
  model = nnx.merge(graphdef, params, rest)
  x, aux = model.features(batch.inputs, positions=batch.positions, segment_ids=batch.segment_ids)
  nll_sum, count = chunked_cross_entropy(x, model.lm_head.kernel[...], batch.targets, batch.loss_mask, loss_chunk)
  return nll_sum, count, aux


def update_router_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing. bias, load: [L, E] -> bias + rate · sign(mean_load − load) per layer."""
  mean = jnp.mean(load.astype(jnp.float32), axis=-1, keepdims=True)
  return bias + rate * jnp.sign(mean - load.astype(jnp.float32))


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformationExtraArgs,
  c: ml_collections.ConfigDict,
  shardings: TrainState | None = None,
):
  """Returns step(state: TrainState, batch: Batch) -> (state, metrics), jit-compiled; `state` is donated.

  The batch [B, S] is split into `c.microbatches` pieces whose gradients are summed in a scan, so activation
  memory is that of one piece. Expert loads and max logits are accumulated across pieces (sum / max).
  `shardings` (a TrainState of NamedShardings) pins the state's layout across steps.

  The metrics also carry the step's finite flag (FINITE_KEY: loss and gradient norm finite) and one flag per
  parameter leaf (GRAD_LEAF_FINITE_KEY), for the loop's `NonFiniteGuard` (training/guards.py); with
  `c.on_nonfinite == "skip"` a non-finite step returns the state it was given. With `c.debug_nan_step` set the
  step takes a third argument, the loop's step number, and makes that step's loss NaN.
  """

  on_nonfinite = c.get("on_nonfinite", "stop")
  if on_nonfinite not in NONFINITE_ACTIONS:
    raise ValueError(f"config.on_nonfinite {on_nonfinite!r} not in {NONFINITE_ACTIONS}")
  debug_nan_step = c.get("debug_nan_step", -1)
  poison = debug_nan_step is not None and debug_nan_step >= 0  # static: the production step has no trace of it

  def loss_fn(params, rest, batch: Batch, scale):
    nll_sum, count, aux = sum_nll(graphdef, params, rest, batch, c.loss_chunk)
    if scale is not None:  # config.debug_nan_step: NaN at that step, 1 elsewhere
      nll_sum = nll_sum * scale
    return nll_sum, (count, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(params, rest, batch, scale):
    if c.microbatches == 1:
      (nll, (count, aux)), grads = grad_fn(params, rest, batch, scale)
      return nll, count, aux, grads
    pieces = jax.tree.map(lambda x: x.reshape((c.microbatches, -1) + x.shape[1:]), batch)

    def body(carry, piece):
      (nll, (count, aux)), grads = grad_fn(params, rest, piece, scale)
      if carry is None:
        return (nll, count, aux, grads), None
      n0, c0, a0, g0 = carry
      merged_aux = {"max_logits": jax.tree.map(jnp.maximum, a0["max_logits"], aux["max_logits"])}
      if "expert_load" in aux:
        merged_aux["expert_load"] = a0["expert_load"] + aux["expert_load"]
        merged_aux["dropped_pairs"] = a0["dropped_pairs"] + aux["dropped_pairs"]
      return (n0 + nll, c0 + count, merged_aux, jax.tree.map(jnp.add, g0, grads)), None

    first = body(None, jax.tree.map(lambda x: x[0], pieces))[0]
    (nll, count, aux, grads), _ = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], pieces))
    return nll, count, aux, grads

  def step(state: TrainState, batch: Batch, step_number=None):
    params, rest = state.params, state.rest
    scale = None
    if poison:
      if step_number is None:
        raise ValueError("config.debug_nan_step is set: call the step as step(state, batch, step_number)")
      scale = jnp.where(step_number == debug_nan_step, jnp.float32(jnp.nan), jnp.float32(1.0))
    nll, count, aux, grads = accumulate(params, rest, batch, scale)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # gradient of the mean NLL over all masked tokens
    updates, opt_state = tx.update(grads, state.opt_state, params, max_logits=aux["max_logits"])
    params = optax.apply_updates(params, updates)
    per_layer = jnp.concatenate(
      [jnp.max(aux["max_logits"][g], axis=-1) for g in LAYER_GROUPS if g in aux["max_logits"]]
    )  # [L] max over heads
    loss, grad_norm = nll / count, optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "max_logit": jnp.max(per_layer),
      "max_logit_per_layer": per_layer,
      # Read by the loop only with the logged metrics or before a save (no host sync per step); not logged.
      FINITE_KEY: finite,
      GRAD_LEAF_FINITE_KEY: jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]),
    }
    if c.optimizer == "muon_clip" and qk_clip_tau(c) is not None:
      metrics["heads_clipped"] = sum(jnp.sum(v > qk_clip_tau(c)) for v in aux["max_logits"].values())
    if "expert_load" in aux:
      rest = with_router_biases(
        rest, update_router_bias(router_biases(rest), aux["expert_load"], c.router_bias_update_rate)
      )
      load = aux["expert_load"].astype(jnp.float32)
      metrics["expert_load_max_over_mean"] = jnp.max(load / jnp.mean(load, axis=-1, keepdims=True))
      metrics["dropped_pairs"] = aux["dropped_pairs"]
      metrics["expert_load"] = aux["expert_load"]  # [L, E]; the writer turns it into histograms
    new_state = TrainState(params, rest, opt_state)
    if on_nonfinite == "skip":  # a non-finite step leaves params, router biases and optimizer state as they were
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, metrics

  return jax.jit(step, donate_argnums=0, out_shardings=None if shardings is None else (shardings, None))


def make_eval_step(graphdef: nnx.GraphDef, c: ml_collections.ConfigDict):
  """Returns eval_step(params, rest, batch: Batch) -> (sum of masked NLL, masked tokens), f32 scalars, jit-compiled
  once: the train step's loss without gradients or updates, the batch [B, S] taken in `c.microbatches` sequential
  pieces as the train step takes it (so activation memory is no larger). Inputs keep the shardings they come with
  (the train state's, the global batch's)."""

  def eval_step(params: dict, rest: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
    if c.microbatches == 1:
      return sum_nll(graphdef, params, rest, batch, c.loss_chunk)[:2]
    pieces = jax.tree.map(lambda x: x.reshape((c.microbatches, -1) + x.shape[1:]), batch)
    nll, count = jax.lax.map(lambda piece: sum_nll(graphdef, params, rest, piece, c.loss_chunk)[:2], pieces)
    return jnp.sum(nll), jnp.sum(count)

  return jax.jit(eval_step)
