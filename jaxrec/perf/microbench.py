"""Fits a hardware profile for the devices this process sees, from microbenchmarks.

Every device runs the benchmark at once (one shard_map over all of them), so the
figures are per device *while all devices are busy* — on a CPU host with faked
devices that is the host's throughput shared out, which is what a train step on
that mesh gets. Measured: matmul FLOP/s (fp32 and bf16), streaming memory
bandwidth, and all-reduce latency and bandwidth (least-squares fit of
time = ring_steps x latency + wire_bytes / bandwidth over message sizes).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.hardware import Hardware
from jaxrec.perf.cost_model import LATENCY_STEPS, RING_WIRE
from jaxrec.timing import median_seconds


def _per_device(mesh, shape, dtype, seed=0):
  n = mesh.size
  x = jax.random.normal(jax.random.key(seed), (n, *shape), jnp.float32).astype(dtype)
  return jax.device_put(x, NamedSharding(mesh, P("all")))


def matmul_flops(mesh, n: int = 512, dtype=jnp.float32, repeats: int = 5, chain: int = 4) -> float:
  """Per-device FLOP/s of `chain` dependent n x n matmuls."""
  def body(a, b):
    x = a[0]
    for _ in range(chain):
      x = x @ b[0]
    return x[None]
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("all"), P("all")),
                             out_specs=P("all")))
  a = _per_device(mesh, (n, n), dtype, 0)
  b = _per_device(mesh, (n, n), dtype, 1) * (1.0 / np.sqrt(n))
  seconds = median_seconds(fn, lambda: (a, b.astype(dtype)), repeats)
  return chain * 2.0 * n ** 3 / seconds


def memory_bandwidth(mesh, mib: int = 64, repeats: int = 5) -> float:
  """Per-device bytes/s of a streaming read + write (x * 2 + 1)."""
  elems = mib * 2 ** 20 // 4
  fn = jax.jit(jax.shard_map(lambda x: x * 2.0 + 1.0, mesh=mesh, in_specs=P("all"),
                             out_specs=P("all")))
  x = _per_device(mesh, (elems,), jnp.float32)
  return 2.0 * elems * 4 / median_seconds(fn, lambda: (x,), repeats)


def all_reduce_fit(mesh, sizes_kib=(1, 16, 256, 1024, 4096, 16384), repeats: int = 5
                   ) -> tuple[float, float, list[tuple[int, float]]]:
  """(latency per ring step, wire bandwidth bytes/s, [(bytes, seconds)]) of psum."""
  n = mesh.size
  fn = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "all"), mesh=mesh,
                             in_specs=P("all"), out_specs=P()))
  rows, samples = [], []
  for kib in sizes_kib:
    elems = kib * 1024 // 4
    x = _per_device(mesh, (elems,), jnp.float32)
    seconds = median_seconds(fn, lambda: (x,), repeats)
    rows.append([LATENCY_STEPS["all-reduce"](n), RING_WIRE["all-reduce"](n) * elems * 4])
    samples.append((elems * 4, seconds))
  a = np.asarray(rows, np.float64)
  y = np.asarray([s for _, s in samples])
  coef, *_ = np.linalg.lstsq(a, y, rcond=None)
  latency = max(float(coef[0]), 1e-9)
  bandwidth = 1.0 / max(float(coef[1]), 1e-15)
  return latency, bandwidth, samples


def _device_memory(devices) -> float:
  """The accelerator's own limit, or the host's RAM shared over the faked devices."""
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return float(stats["bytes_limit"])
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / len(devices)


def fit_local_profile(devices=None, quick: bool = False) -> tuple[Hardware, dict]:
  """A Hardware profile of these devices plus the raw measurements."""
  devices = list(devices or jax.devices())
  mesh = jax.sharding.Mesh(np.asarray(devices), ("all",))
  repeats = 3 if quick else 5
  n = 256 if quick else 512
  fp32 = matmul_flops(mesh, n, jnp.float32, repeats)
  bf16 = matmul_flops(mesh, n, jnp.bfloat16, repeats)
  hbm = memory_bandwidth(mesh, 16 if quick else 64, repeats)
  sizes = (1, 64, 1024, 4096) if quick else (1, 16, 256, 1024, 4096, 16384)
  if len(devices) > 1:
    latency, bandwidth, samples = all_reduce_fit(mesh, sizes, repeats)
  else:
    latency, bandwidth, samples = 0.0, float("inf"), []
  kind = devices[0].device_kind
  memory = _device_memory(devices)
  hw = Hardware(
      name=f"local-{devices[0].platform}", peak_flops=bf16, peak_flops_fp32=fp32,
      hbm_bandwidth=hbm, hbm_bytes=memory, fast_bandwidth=bandwidth, slow_bandwidth=bandwidth,
      fast_latency=latency, slow_latency=latency, fast_domain=len(devices),
      source=f"fitted by jaxrec.perf.microbench on {len(devices)}x {kind}")
  raw = {"matmul_fp32_flops": fp32, "matmul_bf16_flops": bf16, "memory_bandwidth": hbm,
         "all_reduce_samples": samples, "all_reduce_latency": latency,
         "all_reduce_bandwidth": bandwidth, "devices": len(devices), "device_kind": kind}
  return hw, raw
