"""TrainState: everything a run needs to continue, as one pytree of sharded arrays."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct
from jax.sharding import PartitionSpec as P


@struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer steps taken
  params: Any            # pure dict; stacked layers in the pipeline's slot layout
  opt_state: Any         # optax state over `params`
  dp_state: Any          # data-parallel mode state (pending gradients, anchors, ...)
  comp_state: Any        # compressor state (error feedback, PowerSGD Q, ...)
  rng: jax.Array         # uint32[2] raw key data: the run's base PRNG key


def opt_state_specs(opt_shapes: Any, param_shapes: Any, param_specs: Any) -> Any:
  """Optimizer state shards like the params it belongs to; counters are replicated.

  A state leaf belongs to the param whose dict-key path ends its own (`[0].mu['items']
  ['table']`, `inner_states['table']...sum_sq['items']['table']`): of the same shape it
  takes the param's spec; with the same leading dim (a row-wise accumulator [R, 1])
  the spec of that dim. Matching paths rather than optax's placeholders keeps this
  right for masked, partitioned and row-wise states alike."""
  params = {_dict_keys(path): (tuple(leaf.shape), spec) for (path, leaf), spec in zip(
      jax.tree_util.tree_leaves_with_path(param_shapes),
      jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P)))}

  def spec_for(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      if keys[start:] in params:
        shape, spec = params[keys[start:]]
        if tuple(leaf.shape) == shape:
          return spec
        if leaf.ndim == len(shape) and leaf.shape[:1] == shape[:1] and len(spec):
          return P(spec[0], *([None] * (leaf.ndim - 1)))
        break
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, opt_shapes)


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
