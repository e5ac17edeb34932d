"""Automatic strategy planning: every way to run a config on N devices, ranked.

Candidates are the factorisations of N over (replica, data, pipe, tensor); for a
pipeline every schedule with every valid microbatch count (the scanned executor
compiles to the same program whatever the count) and interleaving depth up to 4 (layers split by the balancer on analytic costs); and
the item table's sharding (over tensor, replicated over data; or its rows and their
optimizer state over data x tensor, exact with the dense optimizer, so no quality is
traded); the gradient compressions that kept quality within seed noise in our ML-1M sweep
(none, bf16, int8; top-k, PowerSGD and sign lost 3-10% NDCG, so the planner does
not trade quality for speed on the user's behalf). A `replica` axis only pays off
with hierarchical compression over it, so it is only tried with one. Each
candidate is costed from the analytic profile (no devices needed); one that does not
fit memory is tried again with every layer rematerialised (`model.remat=full`), dropped
if it still does not fit, and the rest are ranked by step time.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Iterator

import ml_collections

from jaxrec.config import LOCAL_MODES, with_overrides
from jaxrec.hardware import Hardware
from jaxrec.layout import Layout
from jaxrec.mesh import AXES, MeshShape
from jaxrec.models.losses import LossConfig
from jaxrec.models.recommender import ModelConfig, RecommenderFns
from jaxrec.parallel import pipeline
from jaxrec.perf import cost_model, strategy

SCHEDULES = ("gpipe", "1f1b", "interleaved")
COMPRESSIONS = ("none", "bf16", "int8")
MAX_VIRTUAL = 4   # interleaving deeper than this buys little bubble for many more sends


def schedule_ok(name: str, pipe: int, microbatches: int, virtual: int) -> bool:
  try:
    pipeline.validate_schedule(name, pipe, microbatches, virtual)
  except ValueError:
    return False
  return True


@dataclasses.dataclass(frozen=True)
class Candidate:
  shape: MeshShape
  overrides: dict[str, Any]      # config field -> value (what `--config.<field>=` takes)
  prediction: cost_model.Prediction
  profile: cost_model.StepProfile

  @property
  def mesh_spec(self) -> str:
    return _spec(self.shape)

  def flags(self) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in self.overrides.items())


def factorisations(n: int, parts: int = 4) -> Iterator[tuple[int, ...]]:
  """Ordered tuples of `parts` positive ints whose product is n."""
  if parts == 1:
    yield (n,)
    return
  for f in range(1, n + 1):
    if n % f == 0:
      for rest in factorisations(n // f, parts - 1):
        yield (f, *rest)


def mesh_candidates(config: ml_collections.ConfigDict, devices: int) -> Iterator[MeshShape]:
  """Meshes the model can be split over: tensor divides heads and d_ff, the pipeline
  has at least one layer per stage, the data axes divide the global batch."""
  m = config.model
  for r, d, p, t in factorisations(devices):
    if m.n_heads % t or m.d_ff % t or p > m.n_layers:
      continue
    if config.train.batch_size % (r * d):
      continue
    if r > 1 and d == 1:   # a lone replica axis is just the data axis
      continue
    yield MeshShape(replica=r, data=d, pipe=p, tensor=t)


def variants(config: ml_collections.ConfigDict, shape: MeshShape,
             compressions=COMPRESSIONS) -> Iterator[dict[str, Any]]:
  """Schedule / microbatch / table sharding / compression overrides worth trying."""
  local_batch = config.train.batch_size // shape.data_size
  if shape.pipe > 1:
    pipes = []
    for schedule in SCHEDULES:
      for virtual in (range(2, MAX_VIRTUAL + 1) if schedule == "interleaved" else (1,)):
        if config.model.n_layers < shape.pipe * virtual:
          continue
        for m in range(1, local_batch + 1):
          if local_batch % m == 0 and schedule_ok(schedule, shape.pipe, m, virtual):
            pipes.append({"pipeline.schedule": schedule, "pipeline.virtual_stages": virtual,
                          "pipeline.microbatches": m})
  else:
    pipes = [{}]
  if shape.data_size == 1:
    comps = [{}]
  elif shape.replica > 1:
    comps = [{"compression.method": c, "compression.hierarchical": True}
             for c in compressions if c != "none"]
  else:
    comps = [{"compression.method": c} for c in compressions]
  tables = [{}]
  if shape.data_size > 1:
    # the local modes keep a rows table synchronous (the hybrid): it must then be
    # split over replica too, or its copies there would need a sync of their own
    over_replica = config.dp.mode in LOCAL_MODES and shape.replica > 1
    group = shape.data * shape.tensor * (shape.replica if over_replica else 1)
    rows = {"embedding.sharding": "rows",
            "model.item_table_multiple": math.lcm(config.model.item_table_multiple, group)}
    if over_replica:
      rows["embedding.shard_replica"] = True
    tables.append(rows)
  for p, t, c in itertools.product(pipes, tables, comps):
    yield {**p, **t, **c}


@functools.lru_cache(maxsize=16)
def _fns(cfg: ModelConfig, loss: LossConfig) -> RecommenderFns:
  return RecommenderFns(cfg, loss)


def fns_for(config: ml_collections.ConfigDict, num_items: int) -> RecommenderFns:
  """The model functions of a config (cached: candidates share a model)."""
  return _fns(ModelConfig.from_config(config.model, num_items, config.data.max_len),
              LossConfig.from_config(config.get("loss")))


def evaluate(config: ml_collections.ConfigDict, num_items: int, shape: MeshShape,
             overrides: dict[str, Any], hw: Hardware,
             assumptions: cost_model.Assumptions | None = None) -> Candidate:
  """One candidate, costed from its analytic profile. The chosen layer split and head
  placement are written back into the overrides so the plan runs as predicted."""
  c = with_overrides(config, {"mesh": _spec(shape), **overrides})
  if shape.pipe > 1:
    c.pipeline.layers_per_stage = "auto"
    # a rows-sharded table cannot also be split over pipe by the spread head
    c.pipeline.head = "last" if c.embedding.sharding == "rows" else "auto"
  lay = Layout.build(c, fns_for(c, num_items), shape)
  profile = strategy.analytic_profile(lay)
  prediction = cost_model.predict(profile, hw, assumptions)
  full = {"mesh": _spec(shape), **overrides}
  if shape.pipe > 1:
    full["pipeline.layers_per_stage"] = ",".join(str(n) for n in lay.stages.layers_per_stage)
    full["pipeline.head"] = "spread" if lay.head_spread else "last"
  return Candidate(shape, full, prediction, profile)


def plan(config: ml_collections.ConfigDict, num_items: int, devices: int, hw: Hardware,
         assumptions: cost_model.Assumptions | None = None,
         compressions=COMPRESSIONS) -> tuple[list[Candidate], list[Candidate]]:
  """(candidates that fit, fastest first; those that do not fit memory)."""
  fits, rejected = [], []
  for shape in mesh_candidates(config, devices):
    for overrides in variants(config, shape, compressions):
      cand = evaluate(config, num_items, shape, overrides, hw, assumptions)
      if not cand.prediction.fits and config.model.remat == "none":
        # recomputing each layer in the backward costs a forward; only worth it to fit
        cand = evaluate(config, num_items, shape, {**overrides, "model.remat": "full"}, hw,
                        assumptions)
      (fits if cand.prediction.fits else rejected).append(cand)
  fits.sort(key=lambda x: x.prediction.step_time)
  return fits, rejected


def _spec(shape: MeshShape) -> str:
  return ",".join(f"{a}:{getattr(shape, a)}" for a in AXES if getattr(shape, a) > 1) or "data:1"
