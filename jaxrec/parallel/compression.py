"""Gradient compressors with error feedback, each reducing through a custom collective.

A compressor reduces one gradient leaf (this device's shard, fp32) over the data
axes and returns the SUM over replicas plus its updated per-device state. State
(error-feedback residuals, DGC momentum, PowerSGD's Q) lives in the TrainState
and is checkpointed, so a resumed run continues exactly.

  none      fp32 all-reduce
  bf16      bf16 payload, two-stage exchange (summed in fp32, never on the wire)
  int8      int8 + one fp32 scale per block; optional stochastic rounding; worker
            and server error feedback
  topk      Deep Gradient Compression: chunked top-k of the accumulated residual
            (XLA's top_k sorts whole rows, so rows are capped at `chunk`), optional
            momentum correction with factor masking, sparsity warm-up phases
  powersgd  rank-r power iteration with warm-started Q and error feedback; tensors
            where rank r saves little go uncompressed
  sign      scaled sign (1 bit + one fp32 scale per block), two-stage exchange with
            worker and server error feedback (the 1-bit Adam pattern)

Tensors smaller than `compression.min_size` entries (norms, biases) are always sent
uncompressed (GradientSync): compressing them saves nothing and padding to
per-device chunks would cost more than it saves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from jaxrec.parallel import collectives
from jaxrec.parallel.collectives import Axes

State = dict[str, jax.Array]
FP32 = 4
# DGC's warm-up: sparsity 75%, 93.75%, 98.4375%, 99.6% before the final ratio.
WARMUP_RATIOS = (0.25, 0.0625, 0.015625, 0.004)
FINAL_PHASE = len(WARMUP_RATIOS)   # past the warm-up: the configured ratio


@dataclasses.dataclass(frozen=True)
class ReduceArgs:
  """Per-call context: the axes to sum over, a per-device key, the warm-up phase."""
  axes: Axes
  key: jax.Array | None = None
  phase: int = FINAL_PHASE


class Compressor:
  name = "base"
  flat = True  # works on any flat chunk (so hierarchical reduce-scatter applies)

  def state_shapes(self, shape: tuple[int, ...],
                   group: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-device state for a leaf of local `shape` reduced over `group` devices."""
    return {}

  def init_state(self, shape: tuple[int, ...], group: int, key: jax.Array) -> State:
    return {k: jnp.zeros(s, d) for k, (s, d) in self.state_shapes(shape, group).items()}

  def reduce(self, x: jax.Array, state: State, args: ReduceArgs) -> tuple[jax.Array, State]:
    raise NotImplementedError

  def payload_bytes(self, shape: tuple[int, ...], phase: int = FINAL_PHASE) -> float:
    """Bytes one worker contributes for this tensor (dense fp32 = 4 per entry)."""
    raise NotImplementedError

  def collective_bytes(self, shape: tuple[int, ...], n: int,
                       phase: int = FINAL_PHASE) -> tuple[float, float]:
    """(buffer bytes as the HLO accounting counts them, ring wire bytes per device)
    for reducing this tensor over n devices: the analytic side of comm reports."""
    raise NotImplementedError


class NoCompression(Compressor):
  name = "none"

  def reduce(self, x, state, args):
    return collectives.dense_all_reduce(x, args.axes), state

  def payload_bytes(self, shape, phase=FINAL_PHASE):
    return FP32 * math.prod(shape)

  def collective_bytes(self, shape, n, phase=FINAL_PHASE):
    size = FP32 * math.prod(shape)
    return float(size), 2 * (n - 1) / n * size


class _TwoStage(Compressor):
  """Compressors whose payload goes through `two_stage_all_reduce`."""
  block = 8

  def encoded_bytes(self, rows: int, c: int) -> float:
    raise NotImplementedError

  def collective_bytes(self, shape, n, phase=FINAL_PHASE):
    c = collectives.chunk_len(math.prod(shape), n, self.block)
    enc = self.encoded_bytes(n, c)  # all-to-all of n chunks, then all-gather of n chunks
    return 2.0 * enc, 2 * (n - 1) / n * enc


class BF16(_TwoStage):
  name = "bf16"
  block = 1

  def reduce(self, x, state, args):
    # The payload travels as raw 16-bit words: left as bf16, XLA hoists the decoding
    # cast above the collective and sends fp32 (seen on the CPU backend).
    total, _, _ = collectives.two_stage_all_reduce(
        x, args.axes,
        lambda c, _: lax.bitcast_convert_type(c.astype(jnp.bfloat16), jnp.uint16),
        lambda p: lax.bitcast_convert_type(p, jnp.bfloat16).astype(jnp.float32))
    return total, state

  def payload_bytes(self, shape, phase=FINAL_PHASE):
    return 2 * math.prod(shape)

  def encoded_bytes(self, rows, c):
    return 2.0 * rows * c


class _Blocked(_TwoStage):
  """Shared machinery for int8 and sign: per-block scales, worker + server residuals."""

  def __init__(self, block: int, error_feedback: bool):
    self.block = block
    self.error_feedback = error_feedback

  def state_shapes(self, shape, group):
    if not self.error_feedback:
      return {}
    server = collectives.chunk_len(math.prod(shape), group, self.block)
    return {"worker": (shape, jnp.float32), "server": ((server,), jnp.float32)}

  def encode(self, x: jax.Array, key: jax.Array | None) -> Any:
    raise NotImplementedError

  def decode(self, payload: Any) -> jax.Array:
    raise NotImplementedError

  def reduce(self, x, state, args):
    m = x + state["worker"] if self.error_feedback else x
    total, server, local = collectives.two_stage_all_reduce(
        m, args.axes, self.encode, self.decode, server_error=state.get("server"),
        multiple=self.block, key=args.key)
    if not self.error_feedback:
      return total, state
    return total, {"worker": m - local, "server": server}


class Int8(_Blocked):
  name = "int8"

  def __init__(self, block: int = 256, stochastic: bool = False, error_feedback: bool = True):
    super().__init__(block, error_feedback)
    self.stochastic = stochastic

  def encode(self, x, key):
    rows, c = x.shape
    xb = x.reshape(rows, c // self.block, self.block)
    scale = jnp.max(jnp.abs(xb), axis=-1) / 127.0
    y = xb / jnp.where(scale > 0, scale, 1.0)[..., None]
    if self.stochastic and key is not None:
      y = jnp.floor(y + jax.random.uniform(key, y.shape))
    else:
      y = jnp.round(y)
    return {"q": jnp.clip(y, -127, 127).astype(jnp.int8).reshape(rows, c), "scale": scale}

  def decode(self, p):
    rows, c = p["q"].shape
    q = p["q"].astype(jnp.float32).reshape(rows, c // self.block, self.block)
    return (q * p["scale"][..., None]).reshape(rows, c)

  def payload_bytes(self, shape, phase=FINAL_PHASE):
    n = math.prod(shape)
    return n + FP32 * math.ceil(n / self.block)

  def encoded_bytes(self, rows, c):
    return rows * (c + FP32 * c / self.block)


class Sign(_Blocked):
  name = "sign"

  def __init__(self, block: int = 256, error_feedback: bool = True):
    super().__init__(block, error_feedback)

  def encode(self, x, key):
    rows, c = x.shape
    xb = x.reshape(rows, c // self.block, self.block)
    scale = jnp.mean(jnp.abs(xb), axis=-1)           # L1 scale: the best for sign
    bits = (x >= 0).reshape(rows, c // 8, 8).astype(jnp.uint8)
    packed = jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
    return {"bits": packed, "scale": scale}

  def decode(self, p):
    rows, c8 = p["bits"].shape
    bits = (p["bits"][..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    signs = bits.astype(jnp.float32).reshape(rows, c8 * 8) * 2.0 - 1.0
    signs = signs.reshape(rows, -1, self.block)
    return (signs * p["scale"][..., None]).reshape(rows, c8 * 8)

  def payload_bytes(self, shape, phase=FINAL_PHASE):
    n = math.prod(shape)
    return math.ceil(n / 8) + FP32 * math.ceil(n / self.block)

  def encoded_bytes(self, rows, c):
    return rows * (c / 8 + FP32 * c / self.block)


class TopK(Compressor):
  """Deep Gradient Compression (Lin et al. 2018) with exact-k chunked selection."""
  name = "topk"

  def __init__(self, ratio: float = 0.01, momentum: float = 0.0, chunk: int = 16384,
               warmup_steps: int = 0):
    self.ratio = ratio
    self.momentum = momentum
    self.chunk = chunk
    self.warmup_steps = warmup_steps

  def phase_ratio(self, phase: int) -> float:
    if phase >= len(WARMUP_RATIOS) or self.warmup_steps <= 0:
      return self.ratio
    return max(self.ratio, WARMUP_RATIOS[phase])

  def phase(self, step: int) -> int:
    if self.warmup_steps <= 0:
      return FINAL_PHASE
    return min(step * len(WARMUP_RATIOS) // self.warmup_steps, FINAL_PHASE)

  def _layout(self, n: int, phase: int) -> tuple[int, int, int]:
    chunk = min(self.chunk, n)
    chunks = -(-n // chunk)
    k = max(1, math.ceil(self.phase_ratio(phase) * chunk))
    return chunks, chunk, min(k, chunk)

  def state_shapes(self, shape, group):
    out = {"residual": (shape, jnp.float32)}
    if self.momentum > 0:
      out["momentum"] = (shape, jnp.float32)
    return out

  def reduce(self, x, state, args):
    n = x.size
    u = None
    if self.momentum > 0:
      u = self.momentum * state["momentum"] + x
      v = state["residual"] + u
    else:
      v = state["residual"] + x
    chunks, chunk, k = self._layout(n, args.phase)
    padded = jnp.pad(v.reshape(-1), (0, chunks * chunk - n)).reshape(chunks, chunk)
    _, idx = lax.top_k(jnp.abs(padded), k)                       # [chunks, k]
    values = jnp.take_along_axis(padded, idx, axis=1).reshape(-1)
    flat_idx = (idx + (jnp.arange(chunks) * chunk)[:, None]).reshape(-1)
    total = collectives.sparse_all_reduce(values, flat_idx, chunks * chunk, args.axes)
    keep = jnp.ones((chunks * chunk,), bool).at[flat_idx].set(False)[:n].reshape(x.shape)
    new = {"residual": jnp.where(keep, v, 0.0)}
    if u is not None:
      new["momentum"] = jnp.where(keep, u, 0.0)             # momentum factor masking
    return total[:n].reshape(x.shape), new

  def payload_bytes(self, shape, phase=FINAL_PHASE):
    chunks, _, k = self._layout(math.prod(shape), phase)
    return chunks * k * (FP32 + 4)  # fp32 value + int32 index

  def collective_bytes(self, shape, n, phase=FINAL_PHASE):
    sent = self.payload_bytes(shape, phase)      # all-gather of values and indices
    return float(n * sent), float((n - 1) * sent)


class PowerSGD(Compressor):
  """PowerSGD (Vogels et al. 2019): one power iteration per step, warm-started Q."""
  name = "powersgd"
  flat = False

  def __init__(self, rank: int = 4, error_feedback: bool = True):
    self.rank = rank
    self.error_feedback = error_feedback

  def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The most square 2-D view of the tensor, or None to send it uncompressed."""
    if len(shape) < 2:
      return None
    best = min(range(1, len(shape)),
               key=lambda k: abs(math.log(math.prod(shape[:k]) / math.prod(shape[k:]))))
    a, b = math.prod(shape[:best]), math.prod(shape[best:])
    if self.rank * (a + b) >= a * b // 2:  # no real saving
      return None
    return a, b

  def state_shapes(self, shape, group):
    mat = self.matrix_shape(shape)
    if mat is None:
      return {}
    out = {"q": ((mat[1], self.rank), jnp.float32)}
    if self.error_feedback:
      out["error"] = (shape, jnp.float32)
    return out

  def init_state(self, shape, group, key):
    state = super().init_state(shape, group, key)
    if "q" in state:  # identical on every data replica: the key is the leaf's, not the device's
      state["q"] = jax.random.normal(key, state["q"].shape, jnp.float32)
    return state

  def reduce(self, x, state, args):
    mat = self.matrix_shape(x.shape)
    if mat is None:
      return collectives.dense_all_reduce(x, args.axes), state
    m = x + state["error"] if self.error_feedback else x
    p, q, local = collectives.low_rank_all_reduce(m.reshape(mat), state["q"], args.axes)
    new = {"q": q}
    if self.error_feedback:
      new["error"] = m - local.reshape(x.shape)
    return (p @ q.T).reshape(x.shape), new

  def payload_bytes(self, shape, phase=FINAL_PHASE):
    mat = self.matrix_shape(shape)
    if mat is None:
      return FP32 * math.prod(shape)
    return FP32 * self.rank * (mat[0] + mat[1])

  def collective_bytes(self, shape, n, phase=FINAL_PHASE):
    size = self.payload_bytes(shape, phase)      # all-reduces of P and Q (or dense)
    return float(size), 2 * (n - 1) / n * size


def make_compressor(c: ml_collections.ConfigDict) -> Compressor:
  method = c.method
  if method == "none":
    return NoCompression()
  if method == "bf16":
    return BF16()
  if method == "int8":
    return Int8(block=c.block, stochastic=c.stochastic_rounding,
                error_feedback=c.error_feedback)
  if method == "sign":
    return Sign(block=c.block, error_feedback=c.error_feedback)
  if method == "topk":
    return TopK(ratio=c.ratio, momentum=c.momentum, chunk=c.chunk,
                warmup_steps=c.warmup_steps)
  if method == "powersgd":
    return PowerSGD(rank=c.rank, error_feedback=c.error_feedback)
  raise ValueError(f"unknown compression method {method!r}")
