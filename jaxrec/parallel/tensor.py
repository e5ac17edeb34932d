"""Megatron-style tensor parallelism over one mesh axis, written once.

Layers call these with the axis name they were given (None outside shard_map or
when there is no tensor axis), never with a mesh. Inside `jax.shard_map` with
`check_vma=True`, JAX's varying/invariant typing supplies the backward
collectives as transposes: a replicated activation entering a column-parallel
matmul is implicitly `pvary`'d, whose transpose is the backward all-reduce
(Megatron's "f"); the forward `psum` of a row-parallel matmul transposes to a
no-op (Megatron's "g"). So per transformer layer there is one all-reduce
forward and one backward for attention, and the same for the MLP.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | tuple[str, ...] | None


def _named(axis: AxisName) -> AxisName:
  """None for no axis (None or an empty tuple)."""
  return None if axis is None or axis == () else axis


def axis_index(axis: AxisName) -> jax.Array:
  """This device's index over `axis` (a tuple: row-major over the axes in order)."""
  axis = _named(axis)
  return jnp.int32(0) if axis is None else lax.axis_index(axis)


def axis_size(axis: AxisName) -> int:
  axis = _named(axis)
  if axis is None:
    return 1
  return lax.axis_size(axis) if isinstance(axis, str) else math.prod(lax.axis_size(a) for a in axis)


def all_reduce(x: jax.Array, axis: AxisName) -> jax.Array:
  """Sum over the tensor group (the forward of a row-parallel layer)."""
  axis = _named(axis)
  return x if axis is None else lax.psum(x, axis)


def all_max(x: jax.Array, axis: AxisName) -> jax.Array:
  axis = _named(axis)
  return x if axis is None else lax.pmax(x, axis)


def column_parallel(x: jax.Array, w: jax.Array, equation: str) -> jax.Array:
  """x (replicated) @ w (output features sharded): local slice of the output, no comm."""
  return jnp.einsum(equation, x, w.astype(x.dtype))


def row_parallel(x: jax.Array, w: jax.Array, equation: str, axis: AxisName) -> jax.Array:
  """x (input features sharded) @ w (rows sharded) then one all-reduce."""
  return all_reduce(jnp.einsum(equation, x, w.astype(x.dtype)), axis)


def shard_offset(local_rows: int, axis: AxisName) -> jax.Array:
  """First global row of this device's shard of a table split evenly over `axis`."""
  return axis_index(axis) * local_rows
