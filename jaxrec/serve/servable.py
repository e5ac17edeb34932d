"""A trained checkpoint as a recommender: top-k items for histories, on a mesh of its own.

The inference mesh is chosen independently of the training one: the item table can be
replicated (`data:N`: every device answers its share of a batch alone), split over
`tensor` (with tensor-parallel layers), or split over data x tensor (`rows`: hidden
states are gathered over data so each shard scores every request). The checkpoint is
restored onto that layout through the training restore path (orbax target
shardings, re-laid if the layout differs), and only the params are kept.

`recommend` is one jit per (batch, history length, exclusion width, k) bucket, so a
stream of requests of any size hits a handful of compiled programs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrec.config import ConfigError, saved_config, validate, with_overrides
from jaxrec.data import Dataset, load_dataset
from jaxrec.mesh import make_mesh, mesh_shape
from jaxrec.models.recommender import RecommenderFns
from jaxrec.partitioning import batch_spec
from jaxrec.train import loop
from jaxrec.train.checkpoint import Checkpointer
from jaxrec.train.step import TrainProgram, token_arrays

TABLE_LAYOUTS = ("replicated", "tensor", "rows")
BATCH_BUCKETS = (1, 8, 32, 128)
K_BUCKETS = (10, 20, 50, 100)


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (beyond the largest: the next power of two)."""
  for b in buckets:
    if n <= b:
      return b
  return 1 << math.ceil(math.log2(n))


@dataclasses.dataclass
class Recommendations:
  ids: np.ndarray      # [n, k] internal item ids (1..num_items), best first
  scores: np.ndarray   # [n, k]


class Servable:
  """Params of a checkpoint on an inference mesh, with `recommend`."""

  def __init__(self, config: ml_collections.ConfigDict, fns: RecommenderFns,
               program: TrainProgram, params: Any, step: int):
    self.config, self.fns, self.program, self.params, self.step = (config, fns, program,
                                                                  params, step)
    self.max_len = config.data.max_len
    self.num_items = fns.cfg.num_items
    self.data_size = program.layout.mesh.data_size
    self._compiled: dict[tuple, Any] = {}

  # ------------------------------------------------------------------ loading
  @classmethod
  def load(cls, workdir: str | Path, mesh: str = "data:-1", table: str = "replicated",
           devices: Sequence[jax.Device] | None = None, step: int | None = None,
           batch_buckets: Sequence[int] = BATCH_BUCKETS) -> "Servable":
    """The checkpoint in `workdir` (latest, or `step`; workdir/best when the run
    selected one) on `mesh` with the item table `table`-laid out."""
    workdir = Path(workdir)
    folder = workdir / "best" if (workdir / "best").is_dir() and step is None else (
        workdir / "checkpoints")
    ckpt = Checkpointer(folder, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {folder}; train first or give --workdir of a run")
    meta = ckpt.read_meta(step)
    saved = saved_config(json.loads(meta["config"]))
    if "num_items" not in meta:
      raise ConfigError(f"checkpoint {folder / str(step)} has no num_items in its meta (it "
                        "predates serving); retrain it with this version")
    config, fns, program = _program(saved, int(meta["num_items"]), mesh, table, devices,
                                    batch_buckets)
    state = loop.restore(ckpt, step, program)
    ckpt.close()
    return cls(config, fns, program, state.params, step)

  @classmethod
  def from_init(cls, config: ml_collections.ConfigDict, num_items: int, mesh: str = "data:-1",
                table: str = "replicated", devices: Sequence[jax.Device] | None = None,
                batch_buckets: Sequence[int] = BATCH_BUCKETS) -> "Servable":
    """Freshly initialised params of `config` (benchmarks: latency needs no training)."""
    config, fns, program = _program(config, num_items, mesh, table, devices, batch_buckets)
    return cls(config, fns, program, program.init_state(config.seed).params, 0)

  def dataset(self) -> Dataset:
    """The dataset the run trained on: its original ids and the users' histories."""
    return load_dataset(ml_collections.ConfigDict(self.config.to_dict()).data)

  # ---------------------------------------------------------------- recommend
  def recommend(self, histories: Sequence[Sequence[int]], k: int = 10,
                exclude_history: bool = True) -> Recommendations:
    """Top-k items (internal ids) for each history (internal ids, oldest first)."""
    n = len(histories)
    if n == 0:
      return Recommendations(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
    rows = bucket(math.ceil(n / self.data_size), BATCH_BUCKETS) * self.data_size
    length = bucket(max(min(len(h), self.max_len) for h in histories),
                    [b for b in (8, 16, 32, 64, 128, 256, 512) if b < self.max_len] +
                    [self.max_len])
    widest = max(len(h) for h in histories) if exclude_history else 1
    width = 1 << max(0, math.ceil(math.log2(max(widest, 1))))
    kb = bucket(k, K_BUCKETS)
    inputs = np.zeros((rows, length), np.int32)
    exclude = np.zeros((rows, width), np.int32)
    for r, h in enumerate(histories):
      h = np.asarray(h, np.int32)
      tail = h[-length:]
      inputs[r, length - tail.shape[0]:] = tail
      if exclude_history:
        exclude[r, :h.shape[0]] = h
    fn = self._program_for(rows, length, width, kb)
    ids, scores = fn(self.params, {"inputs": self._put(inputs), "exclude": self._put(exclude)})
    ids, scores = jax.device_get((ids, scores))
    return Recommendations(np.asarray(ids)[:n, :k], np.asarray(scores)[:n, :k])

  def warm_up(self, max_batch: int, history_length: int, k: int = 10) -> int:
    """Compiles every batch bucket a micro-batch of up to `max_batch` requests with
    histories of `history_length` items can hit, so no request waits on XLA.
    Returns the number of compiled programs."""
    sizes = {bucket(math.ceil(n / self.data_size), BATCH_BUCKETS) for n in
             range(1, max_batch + 1)}
    history = list(range(1, min(history_length, self.num_items) + 1))
    for size in sorted(sizes):
      self.recommend([history] * min(size * self.data_size, max_batch), k)
    return self.compiled_programs()

  def _put(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, self.program.batch_sharding(x.ndim))

  def _program_for(self, rows: int, length: int, width: int, k: int):
    key = (rows, length, width, k)
    if key not in self._compiled:
      program, fns = self.program, self.fns
      specs = {"inputs": batch_spec(2, program.shape), "exclude": batch_spec(2, program.shape)}

      def local(params, batch):
        ctx = program.context()
        h = fns.last_hidden(params, token_arrays(batch), ctx)
        return fns.top_k(params, h, k, batch["exclude"], ctx)

      out = (batch_spec(2, program.shape), batch_spec(2, program.shape))
      self._compiled[key] = jax.jit(jax.shard_map(
          local, mesh=program.mesh, in_specs=(program.layout.param_specs, specs),
          out_specs=out))
    return self._compiled[key]

  def compiled_programs(self) -> int:
    return len(self._compiled)

  def lowered(self, rows: int, length: int, k: int = 10, width: int = 64):
    """The lowered recommend step of a bucket (for HLO accounting, no arrays)."""
    fn = self._program_for(rows, length, width, bucket(k, K_BUCKETS))
    shapes = {"inputs": jax.ShapeDtypeStruct((rows, length), jnp.int32,
                                             sharding=self.program.batch_sharding(2)),
              "exclude": jax.ShapeDtypeStruct((rows, width), jnp.int32,
                                              sharding=self.program.batch_sharding(2))}
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          self.params)
    return fn.lower(params, shapes)

  def param_bytes_per_device(self) -> float:
    return float(sum(s.data.nbytes for x in jax.tree.leaves(self.params)
                     for s in x.addressable_shards[:1]))


def _program(config: ml_collections.ConfigDict, num_items: int, mesh: str, table: str,
             devices, batch_buckets):
  """(config, fns, program) of a training config on an inference mesh and table layout."""
  if table not in TABLE_LAYOUTS:
    raise ConfigError(f"table layout {table!r}; valid layouts are {', '.join(TABLE_LAYOUTS)}")
  mesh_obj = make_mesh(mesh, devices)
  shape = mesh_shape(mesh_obj)
  if shape.pipe > 1:
    raise ConfigError(f"serving mesh {mesh} has a pipe axis; serve on data/tensor axes")
  if table == "replicated" and shape.tensor > 1:
    raise ConfigError(f"table layout 'replicated' needs a mesh without tensor axis, got {mesh}")
  rows = shape.data_size * max(batch_buckets)
  config = with_overrides(config, {
      "mesh": mesh, "embedding.sharding": "rows" if table == "rows" else "tensor",
      "pipeline.microbatches": 1, "pipeline.layers_per_stage": "uniform", "dp.mode": "sync",
      "compression.method": "none", "compression.hierarchical": False,
      "train.batch_size": rows, "eval.batch_size": rows})
  validate(config, shape)
  fns = RecommenderFns.from_config(config, num_items)
  return config, fns, TrainProgram(config, fns, mesh_obj)


__all__ = ["Recommendations", "Servable", "TABLE_LAYOUTS", "bucket"]
