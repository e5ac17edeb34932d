"""The single-device reference step every parallel path is checked against.

Plain jax: no mesh, no shard_map, no collectives. Same loss normalisation (loss
sum over non-padding targets / their count), same dropout keys, same AdamW, and
optax's own global-norm clip. The full softmax here is the untiled textbook one
(every position's [items] logits at once, masked afterwards), so every parallel
path compared with it also checks the tiled, real-token-only head.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrec.models.recommender import RecommenderFns
from jaxrec.train.step import loss_key, row_keys, token_arrays


def loss_and_grads(fns: RecommenderFns, params: Any, batch: dict, rng: jax.Array | None = None,
                   step: int = 0) -> tuple[jax.Array, Any]:
  """Mean token loss of the whole batch and its gradient."""
  inputs = {k: jnp.asarray(v) for k, v in token_arrays(batch).items()}
  targets = jnp.asarray(batch["targets"])
  keys = None
  if rng is not None and fns.cfg.dropout > 0:
    keys = row_keys(rng, jnp.int32(step), jnp.arange(targets.shape[0]))
  negatives = None if rng is None else loss_key(rng, jnp.int32(step))

  def loss_fn(p):
    ctx = fns.context(row_keys=keys, loss_key=negatives)
    if fns.loss_cfg.type != "full":
      total, count = fns.loss(p, inputs, targets, ctx)
      return total / count
    logits = fns.logits(p, inputs, ctx)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    real = targets > 0
    return jnp.where(real, lse - target, 0.0).sum() / real.sum()

  return jax.value_and_grad(loss_fn)(params)


def update(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
           grad_clip: float) -> tuple[Any, Any]:
  if grad_clip > 0:
    grads, _ = optax.clip_by_global_norm(grad_clip).update(grads, optax.EmptyState())
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
