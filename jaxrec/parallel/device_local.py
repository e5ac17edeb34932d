"""Storage for state that differs on every device (error feedback, pending gradients).

Such state cannot be a replicated or model-sharded array: each device holds its
own values. It is stored as a global array with one leading dimension per mesh
axis it differs over, sharded so each device owns exactly one [1, ..., 1, *local]
block. That makes it an ordinary jax.Array that orbax checkpoints and restores
like everything else. The axes are the data axes plus the axes the gradient leaf
it belongs to is sharded over: the state of a leaf replicated over `pipe` (the
item table) is the same on every stage and must not be typed as varying there.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxrec.mesh import AXES, MeshShape
from jaxrec.partitioning import spec_mesh_axes

LEAD = len(AXES)


def spec(mesh: MeshShape, local_ndim: int, axes: tuple[str, ...] = AXES) -> P:
  return P(*[a if getattr(mesh, a) > 1 else None for a in axes], *([None] * local_ndim))


def global_shape(mesh: MeshShape, local: tuple[int, ...],
                 axes: tuple[str, ...] = AXES) -> tuple[int, ...]:
  return (*[getattr(mesh, a) for a in axes], *local)


def broadcast(mesh: MeshShape, value: jax.Array, axes: tuple[str, ...] = AXES) -> jax.Array:
  """The same local value on every device, in device-local layout (for init)."""
  return jnp.broadcast_to(value, global_shape(mesh, value.shape, axes))


def unwrap(x: jax.Array, axes: tuple[str, ...] = AXES) -> jax.Array:
  """Inside shard_map: [1, ..., 1, *local] -> [*local]."""
  return x.reshape(x.shape[len(axes):])


def wrap(x: jax.Array, axes: tuple[str, ...] = AXES) -> jax.Array:
  return x.reshape((1,) * len(axes) + x.shape)


def leaf_axes(param_spec: P, data_axes: tuple[str, ...]) -> tuple[str, ...]:
  """The mesh axes a leaf's per-device state differs over, in mesh order."""
  used = set(data_axes) | spec_mesh_axes(param_spec)
  return tuple(a for a in AXES if a in used)


def local_shape(shape: tuple[int, ...], param_spec: P, mesh: MeshShape) -> tuple[int, ...]:
  """The shape of one device's shard of an array with `param_spec`."""
  sizes = mesh.as_dict()
  out = []
  for i, dim in enumerate(shape):
    entry = param_spec[i] if i < len(param_spec) else None
    if entry is None:
      out.append(dim)
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    out.append(dim // math.prod(sizes[n] for n in names))
  return tuple(out)


def local_shapes(shapes: Any, specs: Any, mesh: MeshShape) -> Any:
  return jax.tree.map(lambda s, p: local_shape(tuple(s.shape), p, mesh), shapes, specs,
                      is_leaf=lambda x: isinstance(x, P))
