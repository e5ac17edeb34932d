"""Helpers for shard_map's varying/invariant typing (`check_vma=True`).

Inside shard_map every value records the mesh axes it varies over. Scan carries
and branch outputs must agree on that set, and params differentiated per device
must be marked varying on purpose; these helpers do both without caring whether
a value already varies (pcast of an already-varying axis is an error).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
from jax import lax


def varying_axes(x: jax.Array) -> frozenset[str]:
  return frozenset(jax.typeof(x).manual_axis_type.varying)


def zeros(shape: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of an abstract value (e.g. from `jax.eval_shape` inside shard_map), typed
  varying over the same mesh axes."""
  mat = getattr(shape, "manual_axis_type", None)
  axes = mat.varying if mat is not None else ()
  return make_varying(jax.numpy.zeros(shape.shape, shape.dtype), axes)


def make_varying(tree: Any, axes: Iterable[str]) -> Any:
  """pcast every leaf to varying over `axes` (those it does not vary over yet)."""
  axes = tuple(axes)

  def cast(x):
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def tree_varying_axes(tree: Any) -> frozenset[str]:
  out: frozenset[str] = frozenset()
  for leaf in jax.tree.leaves(tree):
    out |= varying_axes(leaf)
  return out
