"""Predicted step time, throughput and utilization of one train step on a target pod.

The inputs are what is exact — per-device FLOPs, wire bytes and collective launches
per mesh axis, peak memory (from the compiled HLO, or the analytic formulas where a
step is too large to compile) — and a hardware profile (`jaxrec/hardware.py`). The
model is deliberately small so every term can be checked by hand:

  compute  = FLOPs / (peak x compute_efficiency)
             + elementwise bytes / (HBM bandwidth x memory_efficiency),
             stretched by the pipeline's lockstep schedule (bubble and stage
             imbalance: `stretch` >= 1)
  comm(op) = launches x latency(tier) + wire bytes / (bandwidth(tier) x link_efficiency)
  step     = stretch x (compute + tensor comm) + pipe comm
             + max(0, data comm - data_overlap x backward compute)

A mesh axis runs on the fast tier when it and every axis inside it (the mesh is laid
out outermost = slowest first) fit in one fast-interconnect domain; a collective over
several axes runs at the slowest of their tiers. Tensor-parallel all-reduces sit on
the critical path (each layer waits for its psum); the data-axis gradient exchange can
hide behind the backward pass only where the mode allows it (`delayed`: step t's
exchange has no dependency on step t's compute).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

from jaxrec.mesh import AXES, MeshShape
from jaxrec.hardware import Hardware

# Sequential latency-bound steps per collective. All-reduce: NCCL's double binary
# tree / XLA's recursive halving-doubling, 2 x ceil(log2 n) (a ring's 2 (n - 1)
# would make 1024-way reductions latency-bound, which they are not in practice);
# the gathers and all-to-all run as rings / pairwise exchanges.
LATENCY_STEPS = {"all-reduce": lambda n: 2 * math.ceil(math.log2(n)), "all-gather": lambda n: n - 1,
              "reduce-scatter": lambda n: n - 1, "all-to-all": lambda n: n - 1,
              "collective-permute": lambda n: 1}
# Share of the payload each device sends (bandwidth-optimal ring / tree schedules).
RING_WIRE = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
             "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
             "collective-permute": lambda n: 1.0}


@dataclasses.dataclass(frozen=True)
class Assumptions:
  """The explicit, tunable guesses. Defaults are typical published figures for large
  transformer training (MFU 40-55% in MaxText/Megatron reports; NCCL/ICI bus
  bandwidth ~80% of link peak); a fitted local profile measures its own peaks, so
  there the efficiencies are 1."""
  compute_efficiency: float = 0.5
  memory_efficiency: float = 0.8
  link_efficiency: float = 0.8
  backward_share: float = 2.0 / 3.0   # backward = 2x forward FLOPs

  @classmethod
  def for_hardware(cls, hw: Hardware) -> "Assumptions":
    if hw.name.startswith("local"):
      return cls(compute_efficiency=1.0, memory_efficiency=1.0, link_efficiency=1.0)
    return cls()


@dataclasses.dataclass(frozen=True)
class CommOp:
  """Collectives with one mesh-axis group: wire bytes each device sends per step and
  the sequential latency-bound steps they take per step."""
  axes: tuple[str, ...]
  wire_bytes: float
  latency_steps: float
  kind: str = "all-reduce"

  @classmethod
  def ring(cls, kind: str, axes: Iterable[str], payload_bytes: float, count: float,
           group_size: int) -> "CommOp":
    """`count` executions of a `kind` collective of `payload_bytes` each."""
    n = group_size
    if n <= 1:
      return cls(tuple(axes), 0.0, 0.0, kind)
    return cls(tuple(axes), RING_WIRE[kind](n) * payload_bytes * count,
               LATENCY_STEPS[kind](n) * count, kind)


@dataclasses.dataclass(frozen=True)
class StepProfile:
  """What one train step does, per device (the inputs of `predict`)."""
  mesh: MeshShape
  flops: float                 # executed per device per step (incl. recompute)
  model_flops: float           # useful FLOPs of the whole step over all devices
  tokens: int                  # global tokens per step
  comm: tuple[CommOp, ...]
  peak_memory_bytes: float
  elementwise_bytes: float = 0.0   # HBM traffic of the non-matmul work per device
  stretch: float = 1.0         # lockstep pipeline time / average busy time (>= 1)
  data_overlap: float = 0.0    # share of the data exchange that may hide behind backward
  bf16: bool = False           # compute dtype: bf16 runs at the bf16 peak
  source: str = "hlo"          # "hlo" (compiled step) or "analytic" (formulas)


@dataclasses.dataclass(frozen=True)
class Prediction:
  step_time: float
  compute_time: float
  comm_time_by_axis: dict[str, float]
  exposed_data_time: float
  stretch: float
  tokens_per_second: float
  utilization: float           # model FLOPs / (devices x peak x step time)
  memory_fraction: float       # peak memory / device memory
  fits: bool

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def axis_tier(axes: Iterable[str], mesh: MeshShape, hw: Hardware,
              placement: tuple[str, ...] = AXES) -> str:
  """'fast' when every axis in `axes`, with all axes inside it, fits one domain.

  `placement` is the device layout, outermost first: jaxrec's meshes (mesh.py) put
  `tensor` innermost; another order shows what that placement is worth."""
  sizes = mesh.as_dict()
  for axis in axes:
    inner = math.prod(sizes[a] for a in placement[placement.index(axis):])
    if inner > hw.fast_domain:
      return "slow"
  return "fast"


def comm_time(op: CommOp, mesh: MeshShape, hw: Hardware, a: Assumptions,
              placement: tuple[str, ...] = AXES) -> float:
  if not op.axes or (op.wire_bytes == 0 and op.latency_steps == 0):
    return 0.0
  tier = axis_tier(op.axes, mesh, hw, placement)
  bandwidth = (hw.fast_bandwidth if tier == "fast" else hw.slow_bandwidth) * a.link_efficiency
  latency = hw.fast_latency if tier == "fast" else hw.slow_latency
  return op.latency_steps * latency + op.wire_bytes / bandwidth


def predict(profile: StepProfile, hw: Hardware, a: Assumptions | None = None,
            placement: tuple[str, ...] = AXES) -> Prediction:
  a = a or Assumptions.for_hardware(hw)
  peak = hw.peak_flops if profile.bf16 else hw.peak_flops_fp32
  compute = (profile.flops / (peak * a.compute_efficiency)
             + profile.elementwise_bytes / (hw.hbm_bandwidth * a.memory_efficiency))
  by_axis: dict[str, float] = {}
  for op in profile.comm:
    key = ",".join(op.axes)
    by_axis[key] = by_axis.get(key, 0.0) + comm_time(op, profile.mesh, hw, a, placement)
  tensor = sum(t for k, t in by_axis.items() if k == "tensor")
  data_keys = [k for k in by_axis if set(k.split(",")) <= {"replica", "data"}]
  data = sum(by_axis[k] for k in data_keys)
  other = sum(t for k, t in by_axis.items() if k != "tensor" and k not in data_keys)
  hidden = profile.data_overlap * a.backward_share * compute
  exposed = max(0.0, data - hidden)
  step = profile.stretch * (compute + tensor) + other + exposed
  devices = profile.mesh.num_devices
  return Prediction(
      step_time=step, compute_time=compute, comm_time_by_axis=by_axis,
      exposed_data_time=exposed, stretch=profile.stretch,
      tokens_per_second=profile.tokens / step,
      utilization=profile.model_flops / (devices * peak * step),
      memory_fraction=profile.peak_memory_bytes / hw.hbm_bytes,
      fits=profile.peak_memory_bytes <= hw.hbm_bytes)
