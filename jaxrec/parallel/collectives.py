"""Custom collectives that move compressed payloads inside shard_map.

Each returns the SUM over the group of what the devices contributed, invariant
over the reduced axes. Compressed payloads are never summed on the wire: integer
sums wrap and sign bits do not add (DESIGN.md, "Known pitfalls"). Quantised
payloads go through a two-stage exchange instead (all-to-all of chunks, a local
fp32 sum of the decoded chunks, re-encode, all-gather); sparse payloads are
all-gathered and scatter-added; low-rank factors are plain fp32 all-reduces.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

Axes = tuple[str, ...]
Encode = Callable[[jax.Array, Any], Any]     # (fp32 [n, c], PRNG key or None) -> payload
Decode = Callable[[Any], jax.Array]          # payload pytree -> fp32 [n, c]


def group_size(axes: Axes) -> int:
  return math.prod(lax.axis_size(a) for a in axes) if axes else 1


def dense_all_reduce(x: jax.Array, axes: Axes) -> jax.Array:
  """The uncompressed reference: one fp32 all-reduce."""
  return lax.psum(x.astype(jnp.float32), axes) if axes else x.astype(jnp.float32)


def padded_chunks(flat: jax.Array, n: int, multiple: int = 1) -> tuple[jax.Array, int]:
  """flat [N] -> [n, c] zero-padded so each of the n chunks has c (a multiple) entries."""
  size = flat.shape[0]
  c = chunk_len(size, n, multiple)
  return jnp.pad(flat, (0, n * c - size)).reshape(n, c), size


def two_stage_all_reduce(x: jax.Array, axes: Axes, encode: Encode, decode: Decode,
                         server_error: jax.Array | None = None, multiple: int = 1,
                         key: jax.Array | None = None):
  """Sum of x over `axes` sending only encoded payloads.

  Stage 1: split the flat tensor into one chunk per device and all-to-all the
  encoded chunks, so device j receives everyone's chunk j; decode and sum in fp32.
  Stage 2: re-encode that partial sum (plus its server error-feedback residual, if
  given), all-gather the encoded chunks, decode.

  Returns (sum with x's shape, new server residual [c] or None, this device's own
  decoded contribution with x's shape — what worker error feedback subtracts).
  """
  k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
  n = group_size(axes)
  chunks, size = padded_chunks(x.reshape(-1).astype(jnp.float32), n, multiple)
  payload = encode(chunks, k1)
  local = decode(payload).reshape(-1)[:size].reshape(x.shape)
  if n == 1:
    return local, server_error, local
  received = jax.tree.map(lambda p: lax.all_to_all(p, axes, 0, 0, tiled=True), payload)
  partial = decode(received).sum(0)                         # [c]: my chunk of the sum
  if server_error is not None:
    partial = partial + server_error
  out = encode(partial[None], k2)
  new_error = None if server_error is None else partial - decode(out)[0]
  gathered = jax.tree.map(
      lambda p: lax.all_gather(p, axes, axis=0, tiled=True, to="invarying"), out)
  total = decode(gathered).reshape(-1)[:size]
  return total.reshape(x.shape), new_error, local


def chunk_len(size: int, n: int, multiple: int = 1) -> int:
  """Length of each device's chunk in `two_stage_all_reduce` (the server residual)."""
  c = -(-size // n)
  return -(-c // multiple) * multiple


def sparse_all_reduce(values: jax.Array, indices: jax.Array, size: int, axes: Axes) -> jax.Array:
  """Sum of k-sparse vectors (values [k], flat indices [k] into [size]) over `axes`:
  all-gather values and indices, then scatter-add locally."""
  if axes:
    values = lax.all_gather(values, axes, axis=0, tiled=True, to="invarying")
    indices = lax.all_gather(indices, axes, axis=0, tiled=True, to="invarying")
  return jnp.zeros((size,), jnp.float32).at[indices].add(values.astype(jnp.float32))


def orthonormalize(p: jax.Array) -> jax.Array:
  """Orthonormal columns spanning p [m, r] (QR; columns of zero norm stay zero-safe)."""
  q, r = jnp.linalg.qr(p)
  sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)
  return q * sign[None]


def low_rank_all_reduce(m: jax.Array, q: jax.Array, axes: Axes):
  """PowerSGD's power-iteration step: sum over `axes` of matrices m [a, b] ~ P Q^T.

  P = psum(m Q), orthonormalised; Q' = psum(m^T P). Returns (P, Q', local P Q_i^T)
  where the last is this device's own decompressed contribution (for error feedback).
  Exact when Q has full rank (r >= min(a, b)).
  """
  p = orthonormalize(dense_all_reduce(m @ q, axes))
  q_local = m.T @ p
  return p, dense_all_reduce(q_local, axes), p @ q_local.T


def hierarchical_all_reduce(x: jax.Array, inner: Axes, outer: Axes,
                            reduce_outer: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Fast axes first: reduce-scatter uncompressed over `inner` (e.g. within a node),
  reduce each device's chunk over `outer` (the slow links) with `reduce_outer`, then
  all-gather over `inner`. Each slow link carries 1/|inner| of the tensor."""
  n = group_size(inner)
  if n == 1:
    return reduce_outer(x)
  chunks, size = padded_chunks(x.reshape(-1).astype(jnp.float32), n)
  mine = lax.psum_scatter(chunks, inner, scatter_dimension=0, tiled=True)[0]
  mine = reduce_outer(mine)
  total = lax.all_gather(mine, inner, axis=0, tiled=True, to="invarying")
  return total[:size].reshape(x.shape)
