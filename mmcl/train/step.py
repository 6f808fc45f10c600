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


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum_steps: int = 1, mesh: Mesh | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the train step.

  Args:
    loss_fn: `(params, batch, rng, train=True) -> (loss [], metrics {name: []})` — the task's loss.
    tx: optimizer. schedule: learning rate as a function of the step (logged).
    grad_accum_steps: micro-batches per step; their gradients are averaged (equal to the full-batch
      gradient for losses that are means over independent examples; for in-batch-negative losses each
      micro-batch has only its own negatives).
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
