"""Deterministic, resumable batches, assembled host-locally into global jax.Arrays.

The training stream is an endless sequence of per-epoch permutations of the
examples; global batch k is positions [k*B, (k+1)*B) of it. Its whole state is
therefore the number of batches consumed, which the checkpoint stores, so a
resumed run sees exactly the batches an uninterrupted one would. Each process
materialises only the rows its devices hold.
"""

from __future__ import annotations

import threading
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxrec.config import PACKINGS, check_exclusion
from jaxrec.data import packing as packing_lib
from jaxrec.data.sequences import EvalExamples, Windows
from jaxrec.mesh import mesh_shape
from jaxrec.partitioning import batch_spec


class TrainStream:
  """Global batch k of the shuffled, epoch-wise stream of training rows.

  Epoch e shuffles the examples with seed (seed, e) and lays them into rows: one
  per row (`packing="none"`, left-padded) or several per row (`"greedy"`, a
  first-fit plan: data/packing.py). Global batch k is rows [k*B, (k+1)*B) of the
  concatenated epochs, so the stream is a pure function of the step and of the
  examples' lengths; each process reads and lays out only its own rows.
  """

  def __init__(self, examples: Windows, global_batch: int, seed: int,
               packing: str = "none", with_times: bool = False):
    if packing not in PACKINGS:
      raise ValueError(f"config.data.packing = {packing!r}; valid values are "
                       f"{', '.join(PACKINGS)}")
    self.examples = examples
    self.global_batch = global_batch
    self.seed = seed
    self.packing = packing
    self.with_times = with_times and examples.has_time
    self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._starts = {0: 0}   # first global row of the epochs known so far
    self._lock = threading.RLock()   # a prefetch thread and the loop share the caches

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets, example ids) of epoch `epoch` (the latest few are cached)."""
    with self._lock:
      return self._plan(epoch)

  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    if epoch not in self._plans:
      order = self._permutation(epoch)
      if self.packing == "greedy":
        self._plans[epoch] = packing_lib.first_fit(self.examples.lengths, order,
                                                   self.examples.max_len)
      else:
        self._plans[epoch] = packing_lib.one_per_row(order)
      for old in [e for e in self._plans if e < epoch - 2]:
        del self._plans[old]
    return self._plans[epoch]

  def epoch_start(self, epoch: int) -> int:
    """The first global row of `epoch` (walking forward from the latest known one)."""
    with self._lock:
      if epoch not in self._starts:
        known = max(e for e in self._starts if e < epoch)
        for e in range(known, epoch):
          self._starts[e + 1] = self._starts[e] + self._plan(e)[0].shape[0] - 1
      return self._starts[epoch]

  def seed_position(self, epoch: int, start_row: int) -> None:
    """Tells a resumed stream where `epoch` starts (so earlier epochs need no plan)."""
    with self._lock:
      self._starts[epoch] = start_row

  def rows(self, k: int, rows: slice = slice(None)) -> list[tuple[int, np.ndarray]]:
    """(epoch, rows within it) making up `rows` of global batch k (crossing epochs)."""
    lo = k * self.global_batch + (rows.start or 0)
    hi = k * self.global_batch + (self.global_batch if rows.stop is None else rows.stop)
    epoch = self.epoch_of_row(lo)
    out = []
    while lo < hi:
      start = self.epoch_start(epoch)
      count = self.plan(epoch)[0].shape[0] - 1
      take = min(hi, start + count) - lo
      if take > 0:
        out.append((epoch, np.arange(lo - start, lo - start + take)))
        lo += take
      epoch += 1
    return out

  def epoch_of_row(self, row: int) -> int:
    with self._lock:
      epoch = max(e for e, start in self._starts.items() if start <= row)
    while self.epoch_start(epoch + 1) <= row:
      epoch += 1
    return epoch

  def position(self, k: int) -> dict[str, int]:
    """Where global batch k starts: enough to resume without earlier plans."""
    epoch = self.epoch_of_row(k * self.global_batch)
    return {"step": k, "epoch": epoch, "epoch_start": self.epoch_start(epoch)}

  def host_batch(self, k: int, rows: slice) -> dict[str, np.ndarray]:
    parts = []
    for epoch, within in self.rows(k, rows):
      offsets, members = self.plan(epoch)
      if self.packing == "greedy":
        parts.append(packing_lib.packed_rows(self.examples, offsets, members, within,
                                             self.with_times))
      else:
        out = self.examples.padded(members[within])
        if not self.with_times:
          out.pop("timestamps", None)
          out.pop("target_times", None)
        parts.append(out)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def indices(self, k: int) -> np.ndarray:
    """Example ids of global batch k, row by row (unpacked: one per row)."""
    ids = []
    for epoch, within in self.rows(k):
      offsets, members = self.plan(epoch)
      ids.extend(members[offsets[r]:offsets[r + 1]] for r in within)
    return np.concatenate(ids)

  def epoch_of(self, k: int) -> float:
    row = k * self.global_batch
    epoch = self.epoch_of_row(row)
    start = self.epoch_start(epoch)
    return epoch + (row - start) / (self.epoch_start(epoch + 1) - start)

  def tokens(self, k: int) -> int:
    """Real targets in global batch k (for throughput accounting)."""
    return self.examples.tokens(self.indices(k))

  def fill_rate(self, epoch: int = 0) -> float:
    return packing_lib.fill_rate(self.examples, *self.plan(epoch))


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


def eval_batches(examples: EvalExamples, batch_size: int, exclude: str = "history",
                 with_times: bool = False):
  """Yields host-global numpy eval batches padded to `batch_size` (weight 0 rows).

  `exclude` (`eval.exclude`) picks each row's exclusion list: the user's whole history
  ("history"), padded to a power-of-two width per batch so only a few shapes are ever
  compiled; only the input window ("input": the row's inputs); or nothing ("none").
  `with_times`: also each input's timestamp and the time of the item it predicts (the
  held-out item's at the last position).
  """
  check_exclusion(exclude)
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
    if exclude == "input":
      removed = inputs.copy()
    elif exclude == "history":
      hists = [examples.history_of(r) for r in rows]
      width = 1 << max(0, int(np.ceil(np.log2(max(1, max(h.shape[0] for h in hists))))))
      removed = np.zeros((batch_size, width), np.int32)
      for i, h in enumerate(hists):
        removed[i, :h.shape[0]] = h
    else:
      removed = np.zeros((batch_size, 1), np.int32)
    batch = {"inputs": inputs, "target": target, "weight": weight, "exclude": removed}
    if with_times and examples.timestamps is not None:
      times = np.zeros(inputs.shape, np.int64)
      times[:rows.shape[0]] = examples.timestamps[rows]
      target_times = np.zeros(inputs.shape, np.int64)
      target_times[:, :-1] = times[:, 1:]
      target_times[:rows.shape[0], -1] = examples.target_time[rows]
      batch.update(timestamps=times, target_times=target_times)
    yield batch
