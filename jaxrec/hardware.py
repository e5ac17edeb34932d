"""Hardware profiles: what a device computes, reads and sends per second.

Figures are the vendors' public peak numbers (sources in the comments); the cost
model applies its own efficiency factors. Links are described per tier: a mesh
axis runs on the fast tier when it (with every axis inside it) fits in one
fast-interconnect domain (an NVLink node, a TPU slice), else on the slow tier
(InfiniBand, data-center network). The local profile is not typed in: it is
fitted from microbenchmarks (`jaxrec.perf.microbench`). The balancer (parallel/)
and the cost model (perf/) both read these, so they live below both.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  peak_flops: float          # dense bf16 matmul FLOP/s per device
  peak_flops_fp32: float     # fp32 FLOP/s per device (what fp32 models run at)
  hbm_bandwidth: float       # bytes/s per device
  hbm_bytes: float           # device memory
  fast_bandwidth: float      # bytes/s one device sends on the fast tier (per axis ring)
  slow_bandwidth: float      # bytes/s one device sends on the slow tier
  fast_latency: float        # seconds per collective step on the fast tier
  slow_latency: float
  fast_domain: int           # devices in one fast-interconnect domain
  source: str = ""

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str) -> "Hardware":
    return cls(**json.loads(text))


# NVIDIA H100 SXM5 80GB in a DGX/HGX H100 node.
H100 = Hardware(
    name="h100",
    # H100 datasheet: BF16 Tensor Core 989 TFLOPS dense (1979 with sparsity);
    # FP32 67 TFLOPS; TF32 Tensor Core 494.7 dense (fp32 models use TF32 matmuls).
    peak_flops=989e12, peak_flops_fp32=494.7e12,
    # H100 SXM datasheet: 80 GB HBM3 at 3.35 TB/s.
    hbm_bandwidth=3.35e12, hbm_bytes=80e9,
    # NVLink 4: 900 GB/s bidirectional per GPU = 450 GB/s each way (datasheet).
    fast_bandwidth=450e9,
    # DGX H100: 8x ConnectX-7 400 Gb/s InfiniBand NDR, one per GPU = 50 GB/s each way.
    slow_bandwidth=50e9,
    fast_latency=5e-6, slow_latency=15e-6,   # typical NCCL per-step latencies
    fast_domain=8,                           # 8 GPUs per NVLink node
    source="NVIDIA H100 Tensor Core GPU datasheet; DGX H100 user guide")

# Google Cloud TPU v5p.
TPU_V5P = Hardware(
    name="tpu_v5p",
    # cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16 per chip (fp32 matmuls run
    # as multi-pass bf16 on the MXU: taken as a third of bf16 here).
    peak_flops=459e12, peak_flops_fp32=153e12,
    # v5p docs: 95 GiB HBM2e at 2765 GB/s.
    hbm_bandwidth=2765e9, hbm_bytes=95 * 2**30,
    # v5p docs: 1200 GB/s bidirectional ICI per chip over 6 torus links (3D torus):
    # a ring along one torus dimension uses 2 links x 100 GB/s each way = 200 GB/s.
    fast_bandwidth=200e9,
    # v5p docs: data-center network 50 Gb/s per chip = 6.25 GB/s.
    slow_bandwidth=6.25e9,
    fast_latency=2e-6, slow_latency=25e-6,
    fast_domain=8960,                        # one v5p pod slice is ICI-connected
    source="cloud.google.com/tpu/docs/v5p (key specifications table)")

PROFILES = {"h100": H100, "tpu_v5p": TPU_V5P}
LOCAL_PROFILE_PATH = Path("out/hardware_local.json")


def get(name: str, path: Path | None = None) -> Hardware:
  """A named profile; 'local' reads the fitted profile (see jaxrec.perf.microbench)."""
  if name == "local":
    path = path or LOCAL_PROFILE_PATH
    if not path.exists():
      raise FileNotFoundError(
          f"no fitted local profile at {path}; run `python -m experiments.validate_cost_model` "
          "(it fits one from microbenchmarks) or pass --hardware=h100 / tpu_v5p")
    return Hardware.from_json(path.read_text())
  if name not in PROFILES:
    raise ValueError(f"unknown hardware {name!r}; known: {sorted(PROFILES) + ['local']}")
  return PROFILES[name]


# device_kind substrings -> the published profile of that device
DEVICE_KINDS = {"H100": H100, "TPU v5p": TPU_V5P, "TPU v5": TPU_V5P}


def for_device(device_kind: str) -> Hardware | None:
  """The published profile of a device kind (`jax.Device.device_kind`), or None when
  there is none (a CPU, an unlisted accelerator): then measure instead."""
  for needle, profile in DEVICE_KINDS.items():
    if needle.lower() in device_kind.lower():
      return profile
  return None
