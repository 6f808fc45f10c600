"""The one generic train step: a pure function (state, batch) -> (state, metrics)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmcl.parallel.mesh import DATA_AXIS
from mmcl.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _split_micro(batch: dict, accum: int, mesh: Mesh | None) -> dict:
  """[B, ...] → [accum, B/accum, ...], micro-batch j = rows {k·accum + j}.

  Taking strided rows keeps every device's micro-batch rows inside its own contiguous block of the
  data-sharded batch, so the split moves no data between devices.
  """
  def split(x):
    b = x.shape[0]
    if b % accum:
      raise ValueError(f"global batch {b} is not divisible by train.grad_accum_steps={accum}")
    y = jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, DATA_AXIS)))
    return y
  return jax.tree.map(split, batch)


def _merge_micro(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Inverse of `_split_micro` for one array: [accum, B/accum, ...] → [B, ...] in batch row order."""
  y = jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
  if mesh is not None:
    y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(DATA_AXIS)))
  return y


def _grad_cache_grads(embed_fn, emb_loss_fn, params, batch, rng, accum, mesh):
  """Exact full-batch gradients of `emb_loss_fn(params, embed_fn(params, batch), batch)` computed
  one micro-batch at a time (gradient caching, Gao et al. 2021).

  1. e_j = embed(params, micro_j) for every micro-batch, without keeping activations;
  2. (loss, aux), (∂L/∂params|direct, ∂L/∂e) from the loss over the whole batch of embeddings;
  3. for each micro-batch, recompute its forward pass and pull ∂L/∂e_j back to the parameters.
  Peak activation memory is one micro-batch's; the result equals the un-accumulated gradient.
  """
  micro = _split_micro(batch, accum, mesh)
  keys = jax.random.split(rng, accum)

  def embed_one(_, xs):
    mb, k = xs
    return None, embed_fn(params, mb, k)
  _, emb_stack = jax.lax.scan(embed_one, None, (micro, keys))
  emb = jax.tree.map(lambda e: _merge_micro(e, mesh), emb_stack)
  (loss, aux), (g_direct, g_emb) = jax.value_and_grad(emb_loss_fn, argnums=(0, 1), has_aux=True)(
      params, emb, batch)
  g_emb_micro = _split_micro(g_emb, accum, mesh)

  def backprop_one(acc, xs):
    mb, k, ge = xs
    _, vjp = jax.vjp(lambda p: embed_fn(p, mb, k), params)
    (g,) = vjp(ge)
    return jax.tree.map(jnp.add, acc, g), None
  grads, _ = jax.lax.scan(backprop_one, g_direct, (micro, keys, g_emb_micro))
  return (loss, aux), grads


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum_steps: int = 1, mesh: Mesh | None = None,
                    grad_cache: tuple[Callable, Callable] | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the train step.

  Args:
    loss_fn: `(params, batch, rng, train=True) -> (loss [], metrics {name: []})` — the task's loss.
    tx: optimizer. schedule: learning rate as a function of the step (logged).
    grad_accum_steps: micro-batches per step; their gradients are averaged (equal to the full-batch
      gradient for losses that are means over independent examples; for in-batch-negative losses each
      micro-batch has only its own negatives — use `grad_cache` for those).
    grad_cache: optional `(embed_fn(params, batch, rng, train=True) -> {name: [B, D]},
      emb_loss_fn(params, embeddings, batch) -> (loss, metrics))`; with grad_accum_steps > 1 the
      step then computes the exact full-batch loss and gradient micro-batch by micro-batch.
  Returns:
    step(state, batch) -> (new_state, metrics). A step whose loss or gradient is not finite leaves
    the state unchanged (except `step`) and reports `nonfinite = 1`, so the caller can stop with the
    last good state intact.
  """
  grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, b, r, train=True), has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    elif grad_cache is not None:
      embed_fn, emb_loss_fn = grad_cache
      (loss, aux), grads = _grad_cache_grads(
          lambda p, b, r: embed_fn(p, b, r, train=True), emb_loss_fn, state.params, batch, rng,
          grad_accum_steps, mesh)
    else:
      micro = _split_micro(batch, grad_accum_steps, mesh)

      def body(carry, xs):
        mb, i = xs
        (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        acc_g, acc_l, acc_a = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_a, a)), None

      zeros_g = jax.tree.map(jnp.zeros_like, state.params)
      aux_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro),
                                                 rng)[0][1])
      zeros_a = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
      (grads, loss, aux), _ = jax.lax.scan(
          body, (zeros_g, jnp.zeros((), jnp.float32), zeros_a),
          (micro, jnp.arange(grad_accum_steps)))
      scale = 1.0 / grad_accum_steps
      grads = jax.tree.map(lambda g: g * scale, grads)
      loss = loss * scale
      aux = jax.tree.map(lambda a: a * scale, aux)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "nonfinite": (~finite).astype(jnp.int32), **aux}
    return new_state, metrics

  return step


def make_eval_step(loss_fn: LossFn) -> Callable[[Any, dict], dict[str, jax.Array]]:
  """(params, batch) -> metrics of the loss without dropout (for the checkpoint metric)."""
  def eval_step(params, batch):
    loss, aux = loss_fn(params, batch, jax.random.PRNGKey(0), train=False)
    return {"loss": loss, **aux}
  return eval_step
