"""Which layer of the model lives in which slot of which pipe device.

Pure bookkeeping (numpy and pytrees, no collectives): the executor, the balancer,
checkpoint re-layout and the cost model all read the same `StageLayout`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class PipelineConfigError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class StageLayout:
  """Layers of the model assigned to P x V virtual stages (V chunks per device).

  Virtual stage s = v * P + d runs on pipe device d as its chunk v (round-robin,
  Megatron-style). Stacked layer params are stored slot-major: slot
  g = d * (V * Lmax) + v * Lmax + l holds the l-th layer of stage s (or padding
  when that stage has fewer than Lmax layers), so sharding the slot axis over
  `pipe` gives each device exactly its chunks.
  """
  n_layers: int
  pipe: int
  virtual: int
  layers_per_stage: tuple[int, ...]

  @classmethod
  def build(cls, n_layers: int, pipe: int, virtual: int = 1,
            layers_per_stage: str | Sequence[int] = "uniform") -> "StageLayout":
    stages = pipe * virtual
    if isinstance(layers_per_stage, str):
      if layers_per_stage != "uniform":
        raise PipelineConfigError(
            f"config.pipeline.layers_per_stage = {layers_per_stage!r}; use 'uniform', "
            f"'auto' or a list of {stages} layer counts")
      if n_layers % stages:
        raise PipelineConfigError(
            f"{n_layers} layers do not split evenly over pipe x virtual_stages = "
            f"{pipe} x {virtual} = {stages} stages; give config.pipeline.layers_per_stage "
            f"as a list of {stages} counts summing to {n_layers}")
      counts = (n_layers // stages,) * stages
    else:
      counts = tuple(int(c) for c in layers_per_stage)
      if len(counts) != stages:
        raise PipelineConfigError(
            f"config.pipeline.layers_per_stage = {list(counts)} has {len(counts)} entries; "
            f"the mesh and virtual_stages need {stages} (pipe {pipe} x virtual {virtual})")
      if any(c < 1 for c in counts):
        raise PipelineConfigError(
            f"config.pipeline.layers_per_stage = {list(counts)}: every stage needs >= 1 layer")
      if sum(counts) != n_layers:
        raise PipelineConfigError(
            f"config.pipeline.layers_per_stage = {list(counts)} covers {sum(counts)} layers "
            f"but the model has {n_layers}")
    return cls(n_layers, pipe, virtual, counts)

  @property
  def stages(self) -> int:
    return self.pipe * self.virtual

  @property
  def slots_per_chunk(self) -> int:
    return max(self.layers_per_stage)

  @property
  def num_slots(self) -> int:
    return self.stages * self.slots_per_chunk

  @property
  def padded(self) -> bool:
    return len(set(self.layers_per_stage)) > 1

  def active_fraction(self) -> float:
    return self.n_layers / self.num_slots

  def slot_layer(self) -> np.ndarray:
    """Layer index per slot [P * V * Lmax] (-1 = padding)."""
    lmax, starts = self.slots_per_chunk, np.cumsum((0,) + self.layers_per_stage)
    out = np.full((self.pipe, self.virtual, lmax), -1, np.int32)
    for d in range(self.pipe):
      for v in range(self.virtual):
        s = v * self.pipe + d
        n = self.layers_per_stage[s]
        out[d, v, :n] = starts[s] + np.arange(n)
    return out.reshape(-1)

  def to_slots(self, layers: Any) -> Any:
    """Canonical stacked layers [L, ...] -> slot layout [P*V*Lmax, ...] (padding = 0)."""
    idx = self.slot_layer()
    take = jnp.asarray(np.maximum(idx, 0))
    valid = jnp.asarray(idx >= 0)

    def leaf(x):
      rows = jnp.take(x, take, axis=0)
      return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), rows, 0)
    return jax.tree.map(leaf, layers)

  def to_canonical(self, slots: Any) -> Any:
    """Slot layout -> canonical [L, ...] (drops padding slots)."""
    idx = self.slot_layer()
    where = np.argsort(np.where(idx >= 0, idx, np.iinfo(np.int32).max))[:self.n_layers]
    return jax.tree.map(lambda x: jnp.take(x, jnp.asarray(where), axis=0), slots)

  def slot_shapes(self, layer_shapes: Any) -> Any:
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((self.num_slots, *s.shape[1:]), s.dtype), layer_shapes)

  def device_tables(self) -> tuple[np.ndarray, np.ndarray]:
    """(layer ids, active) per device, chunk and slot: [P, V, Lmax] each."""
    idx = self.slot_layer().reshape(self.pipe, self.virtual, self.slots_per_chunk)
    return np.maximum(idx, 0), idx >= 0


def parse_layers_per_stage(value: str | Sequence[int]) -> str | tuple[int, ...]:
  """'uniform', 'auto', or layer counts as '3,3,2' / '[3, 3, 2]' / a sequence."""
  if not isinstance(value, str):
    return tuple(int(v) for v in value)
  text = value.strip().strip("[]()")
  if text in ("uniform", "auto"):
    return text
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise PipelineConfigError(
        f"config.pipeline.layers_per_stage = {value!r}; use 'uniform', 'auto' or layer "
        "counts like '3,3,2'") from None


def microbatch(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...]."""
  return x.reshape(m, x.shape[0] // m, *x.shape[1:])
