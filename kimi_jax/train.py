"""Training: one jit-compiled step (loss → grads → optimizer → router-bias update) and the loop around it.

    python -m kimi_jax.train --config configs/tiny.py --workdir runs/demo [--config.steps=100 ...]

Rerunning the same command resumes from the latest checkpoint in WORKDIR/checkpoints. Metrics go to
WORKDIR/metrics.jsonl, one JSON object per logged step. WORKDIR may be a local path or a gs:// URL
(kimi_jax/checkpoint/workdir.py lays it out on either). A NaN/inf loss or gradient norm stops the run before any
checkpoint holding it, or skips the step (config.on_nonfinite); SIGTERM saves a checkpoint at the step in flight
and exits 0 (config.preemption_grace_seconds).

Per step: data iterator → `Batch` (kimi_jax/data/batch.py: inputs, targets, segment_ids, positions, loss_mask,
all [B, S]) → model → logits [B, S, V] f32 → masked next-token cross-entropy → grads w.r.t. the Params →
optimizer → new Params; expert loads [L, E] from the forward pass → router biases. The step maps
`TrainState` (params, rest, opt_state) to the next one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from absl import app, flags, logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kimi_jax import backend, cli_flags, sharding  # noqa: F401 (cli_flags: the shared --config)
from kimi_jax.checkpoint.workdir import Workdir
from kimi_jax.chips import device_peak_flops
from kimi_jax.config import ModelConfig
from kimi_jax.data.batch import Batch
from kimi_jax.model import LAYER_GROUPS, KimiK2, lm_logits
from kimi_jax.model_stats import abstract_model, count_params, train_flops_per_step, train_flops_per_token
from kimi_jax.optim import kimi_muon_dims, kimi_qk_clip, muon_clip, warmup_stable_decay
from kimi_jax.train_config import model_config

if TYPE_CHECKING:  # Orbax is imported only when a run writes checkpoints
  from kimi_jax.checkpoint.manager import TrainCheckpointer

# config.on_nonfinite: what a step with a NaN/inf loss or gradient norm does.
NONFINITE_ACTIONS = ("stop", "skip")
# The step's metrics that carry its finite flags (read by the loop, never logged).
FINITE_KEY = "_finite"
GRAD_LEAF_FINITE_KEY = "_grad_leaf_finite"  # [number of param leaves] bool, in tree_leaves(params) order
# The key the cumulative skipped-step count is kept under in a checkpoint's data state.
SKIPPED_STEPS_KEY = "skipped_steps"

# Where `rest` keeps the router biases: one RouterBias [L, E] stacked over the MoE layers (kimi_jax/model.py).
ROUTER_BIAS_PATH = ("moe_layers", "mlp", "router", "bias")

# Flags (`python -m kimi_jax.train`); --config is shared (kimi_jax/cli_flags.py).
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics: a local path or gs://BUCKET/PATH.")


class TrainState(NamedTuple):
  """Every array training updates, as pure dicts: what `init_train_state` makes and the train step takes and
  returns. A pytree; the same type holds the state's shardings (`shardings()`) or ShapeDtypeStructs
  (`abstract_train_state`). Checkpoints store it as items "state" = {"params", "rest"} and "opt_state"."""

  params: dict  # the model's nnx.Param variables: what the optimizer trains
  rest: dict  # every other model variable: the router biases (ROUTER_BIAS_PATH), moved by expert load
  opt_state: optax.OptState  # the optimizer's state for params

  def shardings(self) -> TrainState:
    """The sharding of every leaf (arrays, or ShapeDtypeStructs that carry one)."""
    return jax.tree.map(lambda a: a.sharding, self)


def router_biases(rest: dict) -> jax.Array:
  """The RouterBias [L, E] of `rest` (a model's non-Param variables as a pure dict, L its MoE layers)."""
  return functools.reduce(lambda tree, key: tree[key], ROUTER_BIAS_PATH, rest)


def with_router_biases(rest: dict, bias: jax.Array) -> dict:
  """`rest` with its RouterBias [L, E] replaced by `bias`; the dicts on the path are copied, `rest` is unchanged."""

  def replace(tree: dict, path: tuple[str, ...]) -> Any:
    return bias if not path else {**tree, path[0]: replace(tree[path[0]], path[1:])}

  return replace(rest, ROUTER_BIAS_PATH)


def learning_rate_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
  final = c.learning_rate * c.final_learning_rate_ratio
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=c.learning_rate,
      warmup_steps=c.warmup_steps,
      decay_steps=max(c.steps, c.warmup_steps + 1),
      end_value=final,
    )
  if c.schedule == "wsd":
    stable = max(c.steps - c.warmup_steps - c.decay_steps, 0)
    return warmup_stable_decay(c.learning_rate, c.warmup_steps, stable, c.decay_steps, final)
  if c.schedule == "linear":  # warm-up, then a straight line to `final` at the last step (K2's anneal stages)
    decay = optax.linear_schedule(c.learning_rate, final, max(c.steps - c.warmup_steps, 1))
    if not c.warmup_steps:
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps), decay], [c.warmup_steps])
  raise ValueError(f"config.schedule {c.schedule!r} is not supported (choose cosine, wsd or linear)")


def schedule_phases(c: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """The phases of `learning_rate_schedule(c)` as (name, first step, end step) in optimizer steps, covering
  [0, c.steps); empty phases are left out."""
  warmup = min(c.warmup_steps, c.steps)
  if c.schedule == "wsd":
    decay_start = max(c.steps - c.decay_steps, warmup)
    bounds = [("warmup", 0, warmup), ("stable", warmup, decay_start), ("cosine decay", decay_start, c.steps)]
  elif c.schedule in ("cosine", "linear"):
    bounds = [("warmup", 0, warmup), (f"{c.schedule} decay", warmup, c.steps)]
  else:
    learning_rate_schedule(c)  # raises, naming the schedule
  return [(name, a, b) for name, a, b in bounds if b > a]


def build_optimizer(
  c: ml_collections.ConfigDict, cfg: ModelConfig, param_shardings: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Global-norm clipping, then AdamW or MuonClip (whose qk-clip reads the forward pass's max logits).

  param_shardings (the params' NamedShardings) lets MuonClip lay Newton–Schulz out over the mesh when
  `c.spread_newton_schulz` is on.
  """
  schedule = learning_rate_schedule(c)
  if c.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=c.adam_b1, b2=c.adam_b2, weight_decay=c.weight_decay)
  elif c.optimizer == "muon_clip":
    spread = param_shardings if c.spread_newton_schulz else None
    # XLA cannot partition the Pallas kernel: on a mesh it runs only inside the spread layout's shard_map.
    ns_impl = c.muon_ns_impl if spread is not None or param_shardings is None else "xla"
    tx = muon_clip(
      schedule,
      weight_decay=c.weight_decay,
      adam_b1=c.adam_b1,
      adam_b2=c.adam_b2,
      qk_clip_tau=qk_clip_tau(c),
      muon_dims=kimi_muon_dims,
      ns_dtype=jnp.dtype(c.muon_ns_dtype),
      **newton_schulz_impl(ns_impl),
      param_shardings=spread,
      qk_clip=kimi_qk_clip(cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim),
    )
  else:
    raise ValueError(f"config.optimizer {c.optimizer!r} is not supported (choose adamw or muon_clip)")
  return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)


def newton_schulz_impl(impl: str) -> dict:
  """muon_clip's ns_impl ("xla" or "pallas", never its own "auto", which would ask this host's backend) and
  ns_interpret for `impl` on `backend.platform()`, the platform being compiled for."""
  impl = backend.resolve("newton_schulz", impl)
  # pallas_kernels.matrix_iteration has a TPU kernel only: elsewhere "pallas" runs that kernel interpreted.
  interpret = impl == "pallas" and backend.pallas_options(native=("tpu",)).get("interpret", False)
  return {"ns_impl": impl, "ns_interpret": interpret}


def qk_clip_tau(c: ml_collections.ConfigDict) -> float | None:
  """τ for MuonClip; None (no clip) when the config gives None or a value <= 0 (the CLI cannot say None)."""
  return c.qk_clip_tau if c.qk_clip_tau is not None and c.qk_clip_tau > 0 else None


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
  parameter leaf (GRAD_LEAF_FINITE_KEY), for the loop's `_NonFiniteGuard`; with `c.on_nonfinite == "skip"` a
  non-finite step returns the state it was given. With `c.debug_nan_step` set the step takes a third argument,
  the loop's step number, and makes that step's loss NaN.
  """

  on_nonfinite = c.get("on_nonfinite", "stop")
  if on_nonfinite not in NONFINITE_ACTIONS:
    raise ValueError(f"config.on_nonfinite {on_nonfinite!r} not in {NONFINITE_ACTIONS}")
  debug_nan_step = c.get("debug_nan_step", -1)
  poison = debug_nan_step is not None and debug_nan_step >= 0  # static: the production step has no trace of it

  def loss_fn(params, rest, batch: Batch, scale):
    model = nnx.merge(graphdef, params, rest)
    x, aux = model.features(batch.inputs, positions=batch.positions, segment_ids=batch.segment_ids)
    nll_sum, count = chunked_cross_entropy(x, model.lm_head.kernel[...], batch.targets, batch.loss_mask, c.loss_chunk)
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


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """config.profile_steps "START:END" -> (START, END), 1 <= START <= END; "" -> None."""
  if not spec:
    return None
  try:
    first, last = (int(part) for part in spec.split(":"))
  except ValueError:
    first = last = 0
  if not 1 <= first <= last:
    raise ValueError(f"config.profile_steps must be 'START:END' with 1 <= START <= END, got {spec!r}")
  return first, last


class _Profiler:
  """config.profile_steps: a `jax.profiler` trace of steps START..END under WORKDIR/profile, which TensorBoard's
  profile plugin and XProf read. The profiler writes local files only, so for a bucket it traces into a local
  temporary directory and copies the files up when the trace stops. Nothing is traced when unset."""

  def __init__(self, spec: str, wd: Workdir):
    self.steps = parse_profile_steps(spec)
    self._wd, self._local, self._active = wd, None, False

  def before(self, step: int) -> None:
    if self.steps is None or step != self.steps[0]:
      return
    self._local = tempfile.mkdtemp(prefix="kimi-jax-profile-") if self._wd.remote else os.fspath(self._wd.profile)
    jax.profiler.start_trace(self._local)
    self._active = True

  def after(self, step: int, metrics: Any) -> None:
    if self._active and step == self.steps[1]:
      jax.block_until_ready(metrics)  # the trace holds the steps' device work, not just their dispatch
      self.stop()

  def stop(self) -> None:
    if not self._active:
      return
    jax.profiler.stop_trace()
    self._active = False
    if self._wd.remote:
      for path in sorted(pathlib.Path(self._local).rglob("*")):
        if path.is_file():
          target = self._wd.profile / path.relative_to(self._local).as_posix()
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(path.read_bytes())
      shutil.rmtree(self._local, ignore_errors=True)


class NonFiniteError(FloatingPointError):
  """config.on_nonfinite="stop": a step's loss or gradient norm was NaN or infinite."""


class _NonFiniteGuard:
  """Collects each step's device-side finite flags (no host sync) and reads them in one transfer when the loop
  syncs anyway: with the logged metrics and before a checkpoint save.

  "stop": `check` raises NonFiniteError naming the first bad step and the first parameter whose gradient is
  non-finite there. "skip": the step already left the state unchanged; `check` counts the skipped steps.
  """

  def __init__(self, action: str, params: dict, skipped: int = 0):
    self.action = action
    self.skipped = skipped  # cumulative over the run, resumes included
    self._paths = [
      "/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    self._pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    """Keeps step `step`'s flags (popped from `metrics`, so they are not logged)."""
    flags = {k: metrics.pop(k) for k in (FINITE_KEY, GRAD_LEAF_FINITE_KEY)}
    self._pending.append((step, {**flags, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}))

  def check(self) -> None:
    """Reads the flags of the steps since the last check; raises (stop) or counts them (skip)."""
    pending, self._pending = self._pending, []
    if not pending:
      return
    flags = jax.device_get([f[FINITE_KEY] for _, f in pending])
    bad = [(step, f) for (step, f), ok in zip(pending, flags) if not ok]
    if not bad:
      return
    if self.action == "skip":
      self.skipped += len(bad)
      logging.warning("skipped %d step(s) with a non-finite loss or gradient norm: %s", len(bad), [s for s, _ in bad])
      return
    step, f = bad[0]
    leaf_ok = np.asarray(jax.device_get(f[GRAD_LEAF_FINITE_KEY]))
    leaf = self._paths[int(np.argmin(leaf_ok))] if not leaf_ok.all() else None
    where = f"first non-finite gradient: {leaf}" if leaf else "every gradient is finite (the norm overflowed)"
    raise NonFiniteError(
      f"non-finite training step {step}: loss={float(jax.device_get(f['loss']))}, "
      f"grad_norm={float(jax.device_get(f['grad_norm']))}; {where}. No checkpoint at or after step {step} was "
      "written; rerunning resumes from the last one (config.on_nonfinite=skip skips such steps instead)"
    )


class _Preemption:
  """SIGTERM (a preemption notice) only sets a flag; the loop checks it after each step, saves a checkpoint at that
  step and stops. The previous handler comes back on exit. Outside the main thread (where Python cannot install a
  handler) it does nothing."""

  def __init__(self):
    self.requested_at: float | None = None
    self._previous = None
    self._installed = False

  def __enter__(self) -> _Preemption:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.requested_at is None:
      self.requested_at = time.monotonic()

  def requested(self, at_sync_point: bool) -> bool:
    """Whether to stop now. With several processes all must stop at the same step: they agree only at sync points
    (logged steps and checkpoint steps), where the loop waits on the device anyway."""
    if jax.process_count() == 1:
      return self.requested_at is not None
    if not at_sync_point:
      return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested_at is not None))))

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass(frozen=True)
class ModelShapes:
  """The model split as training splits it, from its shapes alone (nothing is allocated), and where it lives on a
  mesh."""

  graphdef: nnx.GraphDef
  params: nnx.State  # the Params, ShapeDtypeStruct leaves
  rest: nnx.State  # everything else (router biases), ShapeDtypeStruct leaves
  param_shardings: dict  # NamedShardings shaped like params.to_pure_dict()
  rest_shardings: dict  # NamedShardings shaped like rest.to_pure_dict()


def model_shapes(cfg: ModelConfig, mesh) -> ModelShapes:
  """The model's graphdef, abstract params and router state, and their shardings on `mesh`."""
  graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
  return ModelShapes(
    graphdef, params, rest, sharding.state_shardings(params, mesh), sharding.state_shardings(rest, mesh)
  )


def param_shardings(cfg: ModelConfig, mesh) -> dict:
  """The params' NamedShardings on `mesh`, as a pure dict."""
  return model_shapes(cfg, mesh).param_shardings


def abstract_train_state(shapes: ModelShapes, tx: optax.GradientTransformation, mesh) -> TrainState:
  """The train state's ShapeDtypeStructs, each carrying its NamedSharding on `mesh` (nothing is allocated).

  The optimizer state's moments take their parameter's sharding; its counters are replicated.
  """
  with_sharding = lambda tree, sh: jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh
  )
  params = with_sharding(shapes.params.to_pure_dict(), shapes.param_shardings)
  rest = with_sharding(shapes.rest.to_pure_dict(), shapes.rest_shardings)
  opt_state = jax.eval_shape(tx.init, params)
  opt_sh = sharding.like_params(opt_state, params, shapes.param_shardings, mesh)
  return TrainState(params, rest, with_sharding(opt_state, opt_sh))


def init_train_state(c: ml_collections.ConfigDict, cfg: ModelConfig, tx, mesh) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, state), as nnx.split gives them: params, router biases and optimizer state created directly in
  their shards on `mesh` (no host holds the model), from `c.init_from` when set."""
  shapes = model_shapes(cfg, mesh)
  sh = abstract_train_state(shapes, tx, mesh).shardings()

  @functools.partial(jax.jit, out_shardings=(sh.params, sh.rest))
  def create():
    _, params, rest = nnx.split(KimiK2(cfg, rngs=nnx.Rngs(c.seed)), nnx.Param, ...)
    return params.to_pure_dict(), rest.to_pure_dict()

  if c.init_from:  # each host reads only its shards; no random copy is ever made
    from kimi_jax.checkpoint.model_io import init_state_from

    params, rest = init_state_from(c.init_from, cfg, shardings=(sh.params, sh.rest))
  else:
    params, rest = create()
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  return shapes.graphdef, TrainState(params, rest, opt_state)


def _save_checkpoint(ckpt: TrainCheckpointer, step: int, state: TrainState, data_state: dict) -> None:
  """Starts an async save of `state` as the items "state" = {"params", "rest"} (the layout
  kimi_jax.checkpoint.model_io reads as a model) and "opt_state", with the data iterator's state."""
  ckpt.save(step, {"params": state.params, "rest": state.rest}, state.opt_state, data_state)


def _restore_checkpoint(ckpt: TrainCheckpointer, step: int, like: TrainState) -> tuple[TrainState, dict]:
  """(state, data iterator state) saved by `_save_checkpoint` at `step`, in the shapes, dtypes and shardings of
  `like` (arrays or ShapeDtypeStructs)."""
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
  model, opt_state, data_state = ckpt.restore(step, {"params": target.params, "rest": target.rest}, target.opt_state)
  return TrainState(model["params"], model["rest"], opt_state), data_state


def train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train per `c` in `workdir` (resuming if it holds checkpoints). Returns the last logged metrics."""
  from kimi_jax.data.pipeline import ShardedBatches
  from kimi_jax.data.sources import open_source
  from kimi_jax.data.tokenizer import load_tokenizer

  cfg = model_config(c)
  if c.init_from is None:
    raise ValueError(
      "config.init_from is required by this config (it continues an earlier stage): pass "
      "--config.init_from=WORKDIR_OR_CHECKPOINT of the previous stage"
    )
  tokenizer = load_tokenizer(c.tokenizer)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(
      f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids"
    )
  wd = Workdir(workdir)
  wd.create()
  wd.check_architecture(cfg)
  if jax.process_index() == 0:
    wd.write_run_config(cfg, c.to_dict())

  mesh = sharding.make_mesh(c.mesh)
  sharding.check_batch(c.batch_size, mesh)
  if c.batch_size % (c.microbatches * jax.process_count()):
    raise ValueError(
      f"config.batch_size={c.batch_size} is not divisible by microbatches × processes "
      f"({c.microbatches} × {jax.process_count()})"
    )
  tx = build_optimizer(c, cfg, param_shardings(cfg, mesh) if mesh.size > 1 else None)
  graphdef, state = init_train_state(c, cfg, tx, mesh)
  data = ShardedBatches(
    num_shards=c.data_shards or jax.process_count(),
    global_batch_size=c.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    tokenizer=tokenizer,
    source=open_source(c.data, tokenizer, text_field=c.text_field),
    seq_len=c.seq_len,
    seed=c.seed,
  )
  ckpt = wd.checkpointer(keep=c.keep_checkpoints, keep_period=c.keep_period or None)
  start = ckpt.latest_step() or 0
  skipped = 0
  if start:
    state, data_state = _restore_checkpoint(ckpt, start, state)
    skipped = data_state.pop(SKIPPED_STEPS_KEY, 0)
    data.set_state(data_state)
  if jax.process_index() == 0:
    _print_summary(cfg, c, workdir, start, mesh)

  step_fn = make_train_step(graphdef, tx, c, state.shardings())
  guard = _NonFiniteGuard(c.get("on_nonfinite", "stop"), state.params, skipped)
  debug_nan = c.get("debug_nan_step", -1) is not None and c.get("debug_nan_step", -1) >= 0
  grace = c.get("preemption_grace_seconds", 30.0)
  to_global = functools.partial(jax.make_array_from_process_local_data, sharding.batch_sharding(mesh))
  schedule = learning_rate_schedule(c)
  tokens_per_step = c.batch_size * c.seq_len
  writer = MetricsWriter(wd, resume_step=start, flops_per_token=train_flops_per_token(cfg, c.seq_len))
  first, last = None, {}
  progress = _Progress(start, c.steps)
  window_start, window_steps = time.perf_counter(), 0
  preempted_at = None

  def save(step: int) -> None:
    guard.check()  # raises ("stop") before a step past a non-finite one is saved; "skip" kept the state finite
    _save_checkpoint(ckpt, step, state, {**data.get_state(), SKIPPED_STEPS_KEY: guard.skipped})
    writer.flush()  # on a bucket, the metrics up to a checkpoint are stored with it

  profiler = _Profiler(c.get("profile_steps", ""), wd)
  with _Preemption() as preemption:
    try:
      for step in range(start + 1, c.steps + 1):
        batch = jax.tree.map(to_global, next(data))
        profiler.before(step)
        with sharding.use_mesh(mesh):
          state, metrics = step_fn(state, batch, step) if debug_nan else step_fn(state, batch)
        profiler.after(step, metrics)
        guard.add(step, metrics)
        window_steps += 1
        logged = step % c.log_every == 0 or step in (1, c.steps)  # step 1 shows the starting loss
        saving = step % c.checkpoint_every == 0 or step == c.steps
        if logged:
          jax.block_until_ready(metrics)  # dispatch is async: time the finished steps, not their launch
          elapsed = time.perf_counter() - window_start
          guard.check()
          last = writer.write(
            step,
            metrics,
            learning_rate=float(schedule(step - 1)),
            tokens_per_sec=window_steps * tokens_per_step / elapsed,
            skipped_steps=guard.skipped,
          )
          progress.update(step, last)
          first = first or last
          window_start, window_steps = time.perf_counter(), 0
        if saving:
          save(step)
        if step < c.steps and preemption.requested(at_sync_point=logged or saving):
          if not saving:
            save(step)
          preempted_at = step
          break
    except NonFiniteError:
      ckpt.wait()  # the checkpoints before the bad step are finite: let those in flight finish
      ckpt.close()
      writer.close()
      progress.close()
      raise
    finally:
      profiler.stop()  # a run that ends (or fails) inside the range still leaves its trace
    ckpt.wait()  # still under the SIGTERM handler: a notice now lets the last save finish
  ckpt.close()
  writer.close()
  progress.close()
  if preempted_at is not None:
    took = time.monotonic() - preemption.requested_at if preemption.requested_at is not None else 0.0
    if took > grace:
      logging.warning("preemption: saving took %.1f s, over config.preemption_grace_seconds=%g", took, grace)
    if jax.process_index() == 0:
      print(
        f"preempted (SIGTERM): saved a checkpoint at step {preempted_at} {took:.1f} s after the signal; "
        "rerun the same command to resume",
        flush=True,
      )
    return last
  if first is not None and jax.process_index() == 0:
    print(f"loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})")
  if c.sample_tokens and jax.process_index() == 0:
    from kimi_jax.generate import sample

    trained = nnx.merge(graphdef, nnx.State(jax.device_get(state.params)), nnx.State(jax.device_get(state.rest)))
    prompt = tokenizer.encode(c.sample_prompt, add_bos=True)
    new = sample(
      trained,
      prompt,
      max_new_tokens=c.sample_tokens,
      temperature=c.sample_temperature,
      seed=c.seed,
      stop_token=tokenizer.eos_id,
    )
    last["sample"] = c.sample_prompt + tokenizer.decode(new)
    print(f"\nSample from the trained model:\n{last['sample']}\n")
  return last


def _print_summary(cfg: ModelConfig, c: ml_collections.ConfigDict, workdir: str, start: int, mesh) -> None:
  counts = count_params(cfg)
  tokens = c.batch_size * c.seq_len
  print(
    f"kimi-jax train: {counts['total_params']:,} params ({counts['active_params']:,} active), "
    f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, "
    f"dtype {cfg.dtype}, moe_impl {cfg.moe_impl}"
  )
  print(
    f"  batch {c.batch_size}×{c.seq_len} = {tokens:,} tokens/step, "
    f"{train_flops_per_step(cfg, c.batch_size, c.seq_len):.3g} FLOPs/step, {c.optimizer} lr {c.learning_rate:g}"
  )
  if cfg.yarn_active:
    rope = f"YaRN factor {cfg.rope_factor:g} over {cfg.rope_original_max_position_embeddings}"
  elif cfg.rope_factor > 1:  # the weights carry YaRN fields this run leaves off: say so, it changes the numerics
    rope = (
      f"plain (the weights' YaRN factor {cfg.rope_factor:g} is off at seq_len {c.seq_len}; "
      "config.rope_scaling=yarn turns it on, as released models ran)"
    )
  else:
    rope = "plain"
  print(f"  rope {rope}, softmax scale {cfg.softmax_scale:.4g}")
  axes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
  print(f"  mesh {axes} over {jax.device_count()} {jax.default_backend()} device(s), {jax.process_count()} process(es)")
  fresh = f"starting from {c.init_from}" if c.init_from else "starting fresh"
  print(f"  workdir {workdir}: " + (f"resuming at step {start}" if start else fresh) + f", {c.steps} steps", flush=True)


class MetricsWriter:
  """Process 0 logs each logged step to WORKDIR/metrics.jsonl and to TensorBoard (WORKDIR/tensorboard), on local
  disk or a bucket (see kimi_jax.checkpoint.workdir for how each is written there).

  Adds `mfu` (model FLOPs utilisation against the devices' bf16 peak, when the device kind is known) and an
  expert-load histogram per MoE layer (TensorBoard only; metrics.jsonl keeps the max/mean summary). Rows past
  `resume_step` left by an earlier, interrupted run are dropped: this run logs those steps again.
  """

  def __init__(self, workdir: Workdir, *, resume_step: int, flops_per_token: float):
    self._flops_per_token = flops_per_token
    peak = device_peak_flops(jax.devices()[0].device_kind)
    self._peak = peak * jax.device_count() if peak else None
    self._log = self._events = self._tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter

      self._log = workdir.metrics_log(resume_step=resume_step)
      self._events = workdir.events_dir()
      self._tb = SummaryWriter(self._events.local)

  def write(self, step: int, metrics: dict[str, jax.Array], **host_metrics: float) -> dict[str, Any]:
    metrics = jax.device_get(metrics)
    load = metrics.pop("expert_load", None)
    row = {"step": step, **{k: v.tolist() for k, v in metrics.items()}, **host_metrics}
    if self._peak:
      row["mfu"] = row["tokens_per_sec"] * self._flops_per_token / self._peak
    if self._tb is None:
      return row
    self._log.append(row)
    for key, value in row.items():
      if isinstance(value, list):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{key}/layer_{i}", v, step)
      elif key != "step":
        self._tb.add_scalar(key, value, step)
    if load is not None:  # [L, E]: tokens per expert, as a histogram over experts per layer
      for i, layer_load in enumerate(load):
        self._tb.add_histogram(f"expert_load/moe_layer_{i}", np.asarray(layer_load, np.float64), step)
    if self._events.due():
      self._tb.flush()
      self._events.flush()
    return row

  def flush(self) -> None:
    """Stores everything logged so far (locally only the TensorBoard writer's buffer: metrics.jsonl is appended to
    as it goes)."""
    if self._tb is not None:
      self._log.flush(force=True)
      self._tb.flush()
      self._events.flush(force=True)

  def close(self) -> None:
    if self._tb is not None:
      self._log.flush(force=True)
      self._tb.close()
      self._events.close()


class _Progress:
  """A one-line progress bar with ETA (tqdm) on process 0."""

  def __init__(self, start: int, total: int):
    self._bar = None
    if jax.process_index() == 0:
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self._at = start

  def update(self, step: int, metrics: dict[str, Any]) -> None:
    if self._bar is not None:
      self._bar.update(step - self._at)
      self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_sec']:.0f}")
    self._at = step

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or workdir is None:
    raise app.UsageError("give --config (e.g. configs/tiny.py) and --workdir")
  from kimi_jax.distributed import initialize

  initialize()  # joins a multi-process job (TPU pod, SLURM, launch.local); no-op for one process
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  train(config, workdir)


if __name__ == "__main__":
  app.run(main)
