"""TrainState: everything a run needs to continue, as one pytree of sharded arrays."""

from __future__ import annotations

from typing import Any

import jax
import optax
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


def opt_state_specs(tx: optax.GradientTransformation, opt_shapes: Any, param_specs: Any) -> Any:
  """Optimizer moments shard like their params; counters are replicated."""
  return optax.tree_map_params(
      tx, lambda _, spec: spec, opt_shapes, param_specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P))
