"""Deterministic, resumable batches, assembled host-locally into global jax.Arrays.

The training stream is an endless sequence of per-epoch permutations of the
examples; global batch k is positions [k*B, (k+1)*B) of it. Its whole state is
therefore the number of batches consumed, which the checkpoint stores, so a
resumed run sees exactly the batches an uninterrupted one would. Each process
materialises only the rows its devices hold.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxrec.data.sequences import EvalExamples, TrainExamples
from jaxrec.mesh import mesh_shape
from jaxrec.partitioning import batch_spec


class TrainStream:
  """Global batch k of the shuffled, epoch-wise example stream."""

  def __init__(self, examples: TrainExamples, global_batch: int, seed: int):
    self.examples = examples
    self.global_batch = global_batch
    self.seed = seed
    self._perm_epoch = -1
    self._perm = np.empty(0, np.int64)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm = rng.permutation(len(self.examples))
      self._perm_epoch = epoch
    return self._perm

  def indices(self, k: int) -> np.ndarray:
    """Example indices of global batch k (crosses epoch boundaries seamlessly)."""
    n = len(self.examples)
    pos = np.arange(k * self.global_batch, (k + 1) * self.global_batch, dtype=np.int64)
    out = np.empty_like(pos)
    for epoch in np.unique(pos // n):
      sel = pos // n == epoch
      out[sel] = self._permutation(int(epoch))[pos[sel] % n]
    return out

  def epoch_of(self, k: int) -> float:
    return k * self.global_batch / len(self.examples)

  def tokens(self, k: int) -> int:
    """Non-padding targets in global batch k (for throughput accounting)."""
    return int((self.examples.targets[self.indices(k)] > 0).sum())

  def host_batch(self, k: int, rows: slice) -> dict[str, np.ndarray]:
    idx = self.indices(k)[rows]
    return {"inputs": self.examples.inputs[idx], "targets": self.examples.targets[idx]}


def process_rows(mesh: Mesh, global_batch: int) -> slice:
  """The contiguous rows of a global batch that this process's devices hold."""
  sharding = NamedSharding(mesh, batch_spec(1, mesh_shape(mesh)))
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  starts = sorted({(idx[0].start or 0, idx[0].stop or global_batch)
                   for idx in index_map.values()})
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != hi - lo:
    raise ValueError(
        f"this process's devices hold non-contiguous batch rows {starts}; build the mesh "
        "with jaxrec.mesh.build_mesh so each process owns a contiguous block")
  return slice(lo, hi)


def to_global(mesh: Mesh, host: Mapping[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
  """Host-local rows -> global arrays sharded over the data axes."""
  out = {}
  for name, local in host.items():
    sharding = NamedSharding(mesh, batch_spec(local.ndim, mesh_shape(mesh)))
    out[name] = jax.make_array_from_process_local_data(
        sharding, local, (global_batch, *local.shape[1:]))
  return out


def eval_batches(examples: EvalExamples, batch_size: int, exclude_history: bool):
  """Yields host-global numpy eval batches padded to `batch_size` (weight 0 rows).

  The exclusion list is padded to a power-of-two width per batch so only a few
  shapes are ever compiled.
  """
  n = len(examples)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    rows = np.arange(start, stop)
    pad = batch_size - rows.shape[0]
    inputs = np.zeros((batch_size, examples.inputs.shape[1]), np.int32)
    inputs[:rows.shape[0]] = examples.inputs[rows]
    target = np.zeros((batch_size,), np.int32)
    target[:rows.shape[0]] = examples.target[rows]
    weight = np.concatenate([np.ones(rows.shape[0], np.float32), np.zeros(pad, np.float32)])
    if exclude_history:
      hists = [examples.history_of(r) for r in rows]
      width = 1 << max(0, int(np.ceil(np.log2(max(1, max(h.shape[0] for h in hists))))))
      exclude = np.zeros((batch_size, width), np.int32)
      for i, h in enumerate(hists):
        exclude[i, :h.shape[0]] = h
    else:
      exclude = np.zeros((batch_size, 1), np.int32)
    yield {"inputs": inputs, "target": target, "weight": weight, "exclude": exclude}
