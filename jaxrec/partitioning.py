"""Logical axis names -> mesh axes: the one rule table, and the specs derived from it.

Parameters carry logical axis names (Flax `out_sharding` metadata on each
`nnx.Param`); arrays in the train state get their PartitionSpec only through
`RULES`. No other module writes a PartitionSpec for a parameter by hand.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec.mesh import DATA_AXES, MeshShape

LogicalAxes = tuple[str | None, ...]

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": DATA_AXES,
    "seq": None,
    "embed": None,
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "items": "tensor",
    "layers": "pipe",   # stacked layer slots, laid out stage-major (see parallel/pipeline)
}
def rules_for(table_sharding: str = "tensor", shard_replica: bool = False) -> dict:
  """The rule table with the item rows split over `tensor` (the default), or over
  every device that holds the head: data x tensor (and replica if asked) — the
  table and its optimizer state then live once per model replica group."""
  rules = dict(RULES)
  if table_sharding == "rows":
    rules["items"] = (*(DATA_AXES if shard_replica else ("data",)), "tensor")
  return rules


class PartitioningError(ValueError):
  pass


def logical_to_spec(axes: LogicalAxes, mesh: MeshShape | None = None,
                    rules: Mapping | None = None) -> P:
  """Maps one array's logical axes to a PartitionSpec through the rule table.

  Given a mesh shape, mesh axes of size 1 are left out (replicated is the same).
  """
  rules = RULES if rules is None else rules
  out = []
  used: set[str] = set()
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise PartitioningError(
          f"logical axis {name!r} has no rule; known names: {sorted(rules)}")
    mesh_axes = rules[name]
    flat = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    if used.intersection(flat):
      raise PartitioningError(f"logical axes {axes} map two dims onto mesh axes {flat}")
    used.update(flat)
    if mesh is not None:
      flat = tuple(a for a in flat if getattr(mesh, a) > 1)
      mesh_axes = None if not flat else flat[0] if len(flat) == 1 else flat
    out.append(mesh_axes)
  return P(*out)


def tree_specs(logical_tree: Any, mesh: MeshShape | None = None,
               rules: Mapping | None = None) -> Any:
  """Tree of logical-axes tuples -> tree of PartitionSpecs (size-1 axes dropped)."""
  return jax.tree.map(lambda a: logical_to_spec(a, mesh, rules), logical_tree,
                      is_leaf=_is_axes)


def tree_shardings(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int, mesh: MeshShape | None = None) -> P:
  """Batch arrays: leading dim split over (replica, data), the rest replicated."""
  return logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh)


def spec_mesh_axes(spec: P) -> set[str]:
  """The set of mesh axes a spec shards over."""
  axes: set[str] = set()
  for entry in spec:
    if entry is None:
      continue
    axes.update((entry,) if isinstance(entry, str) else entry)
  return axes


def logical_axes_of(state: nnx.State) -> dict:
  """Reads each Param's `out_sharding` metadata into a pure dict of tuples."""
  def axes(var):
    names = var.get_metadata().get("out_sharding")
    if names is None:
      raise PartitioningError(
          f"parameter of shape {var.value.shape} has no logical axes; every nnx.Param "
          "in jaxrec carries out_sharding=(...) metadata")
    if len(names) != var.value.ndim:
      raise PartitioningError(
          f"logical axes {names} do not match parameter shape {var.value.shape}")
    return tuple(names)

  flat = {path: axes(var) for path, var in nnx.to_flat_state(state)}
  return _unflatten(flat)


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _is_axes(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def prepend_axis(logical_tree: Any, name: str) -> Any:
  """Adds a leading logical axis to every leaf (e.g. per-replica copies of params)."""
  return jax.tree.map(lambda a: (name, *a), logical_tree, is_leaf=_is_axes)


def is_axes_leaf(x: Any) -> bool:
  return _is_axes(x)


def check_divisible(shape: Iterable[int], spec: P, mesh: Mesh | MeshShape, what: str) -> None:
  """Clear error when a dim is not divisible by the mesh axes it is sharded over."""
  sizes = mesh.as_dict() if isinstance(mesh, MeshShape) else mesh.shape
  for dim, entry in zip(shape, spec):
    if entry is None:
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    size = 1
    for n in names:
      size *= sizes[n]
    if dim % size:
      raise PartitioningError(
          f"{what}: dimension {dim} is sharded over {names} of total size {size}, "
          "which does not divide it")
