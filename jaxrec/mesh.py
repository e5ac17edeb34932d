"""Mesh specs ("data:2,pipe:2,tensor:2") and the jax Mesh built from them.

Every mesh in jaxrec has the same four axes, outermost (slowest link) first, so
that partition rules and shard_map specs never depend on which axes a user named.
Axes the user leaves out have size 1. This is the only module that decides how
devices are laid out on the mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh

AXES: tuple[str, ...] = ("replica", "data", "pipe", "tensor")
# Axes a batch is split over (and gradients are reduced over).
DATA_AXES: tuple[str, ...] = ("replica", "data")


class MeshSpecError(ValueError):
  """A mesh spec string or shape that cannot be built on the available devices."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
  replica: int = 1
  data: int = 1
  pipe: int = 1
  tensor: int = 1

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(getattr(self, a) for a in AXES)

  @property
  def num_devices(self) -> int:
    return math.prod(self.sizes)

  @property
  def data_size(self) -> int:
    """Number of data-parallel replicas (replica x data)."""
    return self.replica * self.data

  def as_dict(self) -> dict[str, int]:
    return dict(zip(AXES, self.sizes))

  def __str__(self) -> str:
    return ",".join(f"{a}:{s}" for a, s in zip(AXES, self.sizes))


def parse_mesh_spec(spec: str, num_devices: int) -> MeshShape:
  """Parses "data:2,pipe:1,tensor:4" (one size may be -1: inferred).

  Raises MeshSpecError naming the offending part when an axis is unknown,
  repeated, non-positive, or the product does not equal `num_devices`.
  """
  sizes: dict[str, int] = {}
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise MeshSpecError(
        f"empty mesh spec {spec!r}; expected e.g. 'data:{num_devices}' with axes {AXES}")
  for part in parts:
    name, sep, value = part.partition(":")
    name = name.strip()
    if not sep:
      raise MeshSpecError(f"mesh spec part {part!r} in {spec!r} is not 'axis:size'")
    if name not in AXES:
      raise MeshSpecError(
          f"unknown mesh axis {name!r} in {spec!r}; valid axes are {', '.join(AXES)}")
    if name in sizes:
      raise MeshSpecError(f"mesh axis {name!r} appears twice in {spec!r}")
    try:
      size = int(value)
    except ValueError:
      raise MeshSpecError(
          f"mesh axis {name!r} has size {value!r} in {spec!r}; sizes are positive "
          "integers (or -1 for one inferred axis)") from None
    if size == 0 or size < -1:
      raise MeshSpecError(
          f"mesh axis {name!r} has size {size} in {spec!r}; sizes are positive "
          "integers (or -1 for one inferred axis)")
    sizes[name] = size
  inferred = [a for a, s in sizes.items() if s == -1]
  if len(inferred) > 1:
    raise MeshSpecError(f"only one axis may be -1 in {spec!r}, got {inferred}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if inferred:
    if num_devices % known:
      raise MeshSpecError(
          f"cannot infer {inferred[0]!r} in {spec!r}: the other axes multiply to "
          f"{known}, which does not divide the {num_devices} devices")
    sizes[inferred[0]] = num_devices // known
  shape = MeshShape(**sizes)
  if shape.num_devices != num_devices:
    raise MeshSpecError(
        f"mesh {spec!r} has {shape.num_devices} devices ({shape}) but "
        f"{num_devices} are available; make the sizes multiply to {num_devices}")
  return shape


def build_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Lays the devices out so `tensor` gets the fastest links and `replica` the slowest.

  Multi-process runs put `replica` across processes (slices/hosts) via
  `create_hybrid_device_mesh` when it divides evenly; otherwise the physical-topology
  aware `create_device_mesh` orders the devices. On a TPU a layout the topology
  cannot hold is an error (a silent fallback could put `tensor` on slow links); on
  CPU and GPU, where the builders have no topology to follow, a failure falls back
  to device-id order with a warning naming the devices. Axes are Auto (not
  Explicit): the train step is one shard_map over the whole mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) != shape.num_devices:
    raise MeshSpecError(
        f"mesh {shape} needs {shape.num_devices} devices, got {len(devices)}")
  num_processes = len({d.process_index for d in devices})
  try:
    if num_processes > 1 and shape.replica % num_processes == 0:
      per_process = list(shape.sizes)
      per_process[0] //= num_processes
      arranged = mesh_utils.create_hybrid_device_mesh(
          per_process, [num_processes, 1, 1, 1], devices, process_is_granule=True)
    else:
      arranged = mesh_utils.create_device_mesh(shape.sizes, devices)
  except (ValueError, AssertionError, NotImplementedError) as e:
    layout = (f"{len(devices)} {devices[0].platform} devices ({devices[0].device_kind}) "
              f"over {num_processes} process(es)")
    if devices[0].platform == "tpu":
      raise MeshSpecError(
          f"mesh {shape} does not fit the TPU topology of {layout}: {e}. Choose axis "
          "sizes that tile the slice's physical torus (e.g. tensor within a chip's "
          "neighbours) or another factorisation") from e
    logging.warning("mesh %s: no topology-aware layout for %s (%s); devices are laid out "
                    "in id order", shape, layout, e)
    arranged = np.asarray(sorted(devices, key=lambda d: d.id)).reshape(shape.sizes)
  return Mesh(arranged, AXES)


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  return build_mesh(parse_mesh_spec(spec, len(devices)), devices)


def mesh_shape(mesh: Mesh) -> MeshShape:
  return MeshShape(**{a: mesh.shape[a] for a in AXES})


def active_axes(shape: MeshShape, axes: tuple[str, ...] = AXES) -> tuple[str, ...]:
  """The axes among `axes` with size > 1: the only ones worth a collective or a shard.

  A dimension "sharded" over a size-1 axis is replicated; keeping such axes out of
  specs and collectives keeps shard_map's types invariant and the HLO free of
  one-device all-reduces.
  """
  return tuple(a for a in axes if getattr(shape, a) > 1)
