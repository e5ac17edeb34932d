"""Cost model, analytic profiles and the planner (issue 7)."""

from __future__ import annotations

import itertools
import math

import pytest

from jaxrec.config import with_overrides
from jaxrec.hardware import H100, TPU_V5P, Hardware
from jaxrec.layout import Layout
from jaxrec.mesh import MeshShape
from jaxrec.perf import cost_model, hlo, planner, strategy
from jaxrec.perf.comm import abstract_batch, comm_report
from jaxrec.perf.cost_model import Assumptions, CommOp, StepProfile
from tests.helpers import NUM_ITEMS, program, tiny_config

TOY = Hardware(name="toy", peak_flops=100e12, peak_flops_fp32=50e12, hbm_bandwidth=1e12,
               hbm_bytes=16e9, fast_bandwidth=100e9, slow_bandwidth=10e9,
               fast_latency=1e-6, slow_latency=10e-6, fast_domain=4)


# ------------------------------------------------------------ hand-computed cases
def test_axis_tiers_follow_the_mesh_nesting():
  # inner axes first: tensor:8 fills one H100 node; anything outside it is InfiniBand
  assert cost_model.axis_tier(("tensor",), MeshShape(data=4, tensor=8), H100) == "fast"
  assert cost_model.axis_tier(("data",), MeshShape(data=4, tensor=8), H100) == "slow"
  assert cost_model.axis_tier(("data",), MeshShape(data=2, tensor=4), H100) == "fast"
  assert cost_model.axis_tier(("replica", "data"), MeshShape(replica=4, data=4), H100) == "slow"
  # a v5p slice is one ICI domain
  assert cost_model.axis_tier(("data",), MeshShape(data=256, tensor=4), TPU_V5P) == "fast"


def test_tensor_innermost_placement_is_faster_than_tensor_outermost():
  """Issue 6's axis placement, as the cost model sees it: the same step with the
  tensor all-reduces on InfiniBand instead of NVLink."""
  mesh = MeshShape(data=4, tensor=8)
  tensor = CommOp.ring("all-reduce", ("tensor",), 50e6, count=40, group_size=8)
  data = CommOp.ring("all-reduce", ("data",), 200e6, count=1, group_size=4)
  profile = StepProfile(mesh=mesh, flops=1e14, model_flops=3.2e15, tokens=1,
                        comm=(tensor, data), peak_memory_bytes=1.0)
  ours = cost_model.predict(profile, H100)
  swapped = cost_model.predict(profile, H100, placement=("replica", "tensor", "pipe", "data"))
  assert cost_model.axis_tier(("tensor",), mesh, H100, ("replica", "tensor", "pipe", "data")) == "slow"
  assert ours.step_time < swapped.step_time
  assert ours.comm_time_by_axis["tensor"] * 5 < swapped.comm_time_by_axis["tensor"]


def test_prediction_matches_a_hand_computed_step():
  mesh = MeshShape(data=4, tensor=2)      # tensor inner 2 <= 4: fast; data inner 8 > 4: slow
  a = Assumptions(compute_efficiency=0.5, memory_efficiency=0.8, link_efficiency=0.8)
  tensor = CommOp.ring("all-reduce", ("tensor",), payload_bytes=1e6, count=10, group_size=2)
  data = CommOp.ring("all-reduce", ("data",), payload_bytes=4e8, count=1, group_size=4)
  # ring all-reduce: each device sends 2 (n-1)/n of the payload; latency 2 ceil(log2 n)
  assert tensor.wire_bytes == pytest.approx(10 * 1e6)
  assert tensor.latency_steps == 10 * 2
  assert data.wire_bytes == pytest.approx(1.5 * 4e8)
  assert data.latency_steps == 4
  profile = StepProfile(mesh=mesh, flops=5e12, model_flops=8 * 5e12, tokens=1000,
                        comm=(tensor, data), peak_memory_bytes=8e9, elementwise_bytes=8e10,
                        stretch=1.25)
  pred = cost_model.predict(profile, TOY, a)
  compute = 5e12 / (50e12 * 0.5) + 8e10 / (1e12 * 0.8)            # fp32 peak + HBM: 0.3 s
  t_tensor = 20 * 1e-6 + 1e7 / (100e9 * 0.8)                       # fast tier
  t_data = 4 * 10e-6 + 6e8 / (10e9 * 0.8)                          # slow tier
  assert pred.compute_time == pytest.approx(compute)
  assert pred.comm_time_by_axis["tensor"] == pytest.approx(t_tensor)
  assert pred.comm_time_by_axis["data"] == pytest.approx(t_data)
  step = 1.25 * (compute + t_tensor) + t_data
  assert pred.step_time == pytest.approx(step)
  assert pred.tokens_per_second == pytest.approx(1000 / step)
  assert pred.utilization == pytest.approx(8 * 5e12 / (8 * 50e12 * step))
  assert pred.fits and pred.memory_fraction == pytest.approx(0.5)


def test_delayed_mode_hides_the_data_exchange_behind_backward():
  mesh = MeshShape(data=8)
  data = CommOp(("data",), wire_bytes=1e9, latency_steps=0)
  base = dict(mesh=mesh, flops=5e12, model_flops=4e13, tokens=1, comm=(data,),
              peak_memory_bytes=1.0)
  a = Assumptions(compute_efficiency=1.0, link_efficiency=1.0)
  sync = cost_model.predict(StepProfile(**base), TOY, a)
  delayed = cost_model.predict(StepProfile(**base, data_overlap=1.0), TOY, a)
  compute, comm = 5e12 / 50e12, 1e9 / 10e9
  assert sync.step_time == pytest.approx(compute + comm)
  # 2/3 of the compute is backward: 0.0667 s of the 0.1 s exchange is hidden
  assert delayed.step_time == pytest.approx(compute + comm - 2 / 3 * compute)


# ------------------------------------------------- analytic profile vs compiled HLO
CASES = [
    ("data:8", {}),
    ("data:4,tensor:2", {}),
    ("tensor:4,data:2", {}),
    # rows table: its lookup exchange and the head's gathered tokens and statistics
    ("data:8", {"embedding.sharding": "rows"}),
    ("data:2,pipe:2,tensor:2", {"embedding.sharding": "rows", "pipeline.head": "last",
                                "pipeline.schedule": "1f1b", "pipeline.microbatches": 2}),
    # the hybrid: rows table exchanged every step, dense layers averaged every 4
    ("data:4,tensor:2", {"embedding.sharding": "rows", "dp.mode": "local_sgd",
                         "dp.sync_every": 4}),
    # bf16 compute: bytes at the program's dtypes (a CPU compile upcasts them to f32)
    ("data:4,tensor:2", {"model.dtype": "bfloat16"}),
    ("data:4,tensor:2", {"model.dtype": "bfloat16", "embedding.sharding": "rows"}),
    ("data:8", {"compression.method": "int8"}),
    ("replica:2,data:4", {"compression.method": "int8", "compression.hierarchical": True}),
    ("data:2,pipe:2,tensor:2", {"pipeline.schedule": "1f1b", "pipeline.microbatches": 4}),
    ("pipe:2,data:4", {"model.n_layers": 4, "pipeline.schedule": "interleaved",
                       "pipeline.virtual_stages": 2, "pipeline.microbatches": 2,
                       "pipeline.head": "spread"}),
    # HSTU (time bias on: the batch has timestamps): its relative bias's gradient is
    # reduced over tensor too
    ("data:4,tensor:2", {"model.block": "hstu"}),
    # the spread head with tensor: its statistics and gradient reduce over pipe x tensor
    ("data:2,pipe:2,tensor:2", {"pipeline.head": "spread", "pipeline.microbatches": 2}),
]


@pytest.mark.parametrize("spec, overrides", CASES, ids=[c[0] + str(len(c[1])) for c in CASES])
def test_analytic_profile_agrees_with_the_compiled_step(spec, overrides):
  """Bytes per axis within 5% and FLOPs within 1%: the formulas used beyond 64
  devices are the ones checked here on every strategy the CPU can compile."""
  config = tiny_config(mesh=spec, **overrides)
  prog = program(config, spec)
  report = comm_report(prog)
  hlo = strategy.hlo_profile(prog.layout, report)
  lay = Layout.build(config, prog.fns, prog.shape)
  ana = strategy.analytic_profile(lay)
  assert ana.flops == pytest.approx(hlo.flops, rel=0.01)
  measured = _by_axis(hlo.comm)
  expected = _by_axis(ana.comm)
  for key, value in expected.items():
    if value > 0.01 * sum(expected.values()):
      assert measured.get(key, 0.0) == pytest.approx(value, rel=0.05), key
  assert sum(measured.values()) == pytest.approx(sum(expected.values()), rel=0.05)


def test_cpu_upcast_bf16_collectives_count_at_the_program_dtype():
  """XLA's CPU backend computes bf16 collectives in f32; the accounting reads the
  program's dtype from the pre-optimization module, so the rows table's exchange of
  a bf16 model counts 2 bytes per element (what a GPU or TPU sends), and the f32
  head statistics stay 4."""
  config = tiny_config(mesh="data:4,tensor:2",
                       **{"model.dtype": "bfloat16", "embedding.sharding": "rows"})
  prog = program(config, "data:4,tensor:2")
  lowered = prog.jitted_train_step().lower(prog.abstract_state(), abstract_batch(prog))
  text = lowered.compile().as_text()
  assert "_promoted" in text   # the upcast this corrects is there
  compiled = hlo.collectives(text, prog.mesh, prog.branch_weights())
  program_text = lowered.as_text(dialect="hlo", debug_info=True)
  counted = hlo.collectives(text, prog.mesh, prog.branch_weights(), program_text)
  exchange = [(a, b) for a, b in zip(compiled, counted) if "table_rows_exchange" in a.op_name
              and a.kind in ("reduce-scatter", "all-gather") and a.dtypes == ("f32",)]
  assert len(exchange) == 2   # the rows, and their gradients
  assert all(b.bytes * 2 == a.bytes and b.dtypes == ("bf16",) for a, b in exchange)
  stats = [b for b in counted if "item_loss_chunk" in b.op_name]
  assert stats and all(b.dtypes == ("f32",) for b in stats)


def _by_axis(ops):
  out = {}
  for op in ops:
    key = ",".join(op.axes)
    out[key] = out.get(key, 0.0) + op.wire_bytes
  return out


# --------------------------------------------------------------------- planner
def planner_config(devices: int):
  c = tiny_config(**{"train.batch_size": 16, "model.n_layers": 4, "model.dropout": 0.0})
  c.model.d_model, c.model.d_ff = 256, 1024      # big enough that compute matters
  return c


def brute_force(config, devices: int, hw: Hardware):
  """Every (replica, data, pipe, tensor) in [1..N]^4 with product N, every schedule,
  virtual depth, microbatch count, table sharding, remat and compression — no planner
  filters; layouts the library rejects are skipped."""
  best = math.inf
  sizes = range(1, devices + 1)
  for r, d, p, t in itertools.product(sizes, repeat=4):
    if r * d * p * t != devices:
      continue
    shape = MeshShape(replica=r, data=d, pipe=p, tensor=t)
    local = config.train.batch_size / (r * d)
    pipes = [{}]
    if p > 1:
      pipes = [{"pipeline.schedule": s, "pipeline.virtual_stages": v, "pipeline.microbatches": m}
               for s in planner.SCHEDULES for v in range(1, planner.MAX_VIRTUAL + 1)
               for m in range(1, config.train.batch_size + 1)]
    comps = [{"compression.method": c, "compression.hierarchical": h}
             for c in planner.COMPRESSIONS for h in (False, True)]
    multiple = math.lcm(config.model.item_table_multiple, d * t)
    comps += [{**comp, "embedding.sharding": "rows", "model.item_table_multiple": multiple}
              for comp in comps]
    comps += [{**comp, "model.remat": "full"} for comp in comps]
    for extra in pipes:
      for comp in comps:
        try:
          if local != int(local) or (p > 1 and int(local) % extra["pipeline.microbatches"]):
            raise ValueError("batch")
          cand = planner.evaluate(config, NUM_ITEMS, shape, {**extra, **comp}, hw)
        except ValueError:
          continue
        if cand.prediction.fits:
          best = min(best, cand.prediction.step_time)
  return best


@pytest.mark.parametrize("devices, hw", [(4, H100), pytest.param(8, TOY, marks=pytest.mark.slow)],
                         ids=["4xh100", "8xtoy"])
def test_planner_finds_the_brute_force_best(devices, hw):
  config = planner_config(devices)
  fits, _ = planner.plan(config, NUM_ITEMS, devices, hw)
  assert fits, "the planner found nothing that fits"
  assert fits[0].prediction.step_time == pytest.approx(brute_force(config, devices, hw), rel=1e-9)
  times = [c.prediction.step_time for c in fits]
  assert times == sorted(times)


def test_planner_drops_plans_that_do_not_fit_memory():
  config = planner_config(4)
  tiny = Hardware(**{**TOY.__dict__, "name": "tiny-memory", "hbm_bytes": 30e6})
  fits, rejected = planner.plan(config, NUM_ITEMS, 4, tiny)
  assert rejected and all(not c.prediction.fits for c in rejected)
  assert fits and all(c.profile.peak_memory_bytes <= 30e6 for c in fits)
  # the replicated table does not fit, so data-only is among the rejected
  assert any(c.shape == MeshShape(data=4) for c in rejected)


def test_planner_offers_the_hybrid_to_local_modes():
  """With dp.mode = diloco the rows table is a candidate (kept synchronous); with a
  replica axis it is split over replica too, and the plan builds."""
  config = planner_config(8)
  config.dp.mode = "diloco"
  tables = [v for v in planner.variants(config, MeshShape(replica=2, data=4))
            if v.get("embedding.sharding") == "rows"]
  assert tables and all(v["embedding.shard_replica"] for v in tables)
  run = with_overrides(config, {"mesh": "replica:2,data:4", **tables[0]})
  prog = program(run, run.mesh)
  assert set(prog.layout.table_axes) >= {"replica", "data"}


def test_a_plan_runs_with_its_own_overrides():
  """The flags the planner prints build a program whose layout is what it costed."""
  config = planner_config(8)
  fits, _ = planner.plan(config, NUM_ITEMS, 8, H100)
  piped = next(c for c in fits if c.shape.pipe > 1)
  run = with_overrides(config, piped.overrides)
  prog = program(run, run.mesh)
  counts = tuple(int(n) for n in piped.overrides["pipeline.layers_per_stage"].split(","))
  assert tuple(prog.layout.stages.layers_per_stage) == counts
  assert prog.layout.head_spread == (piped.overrides["pipeline.head"] == "spread")


def test_gemm_custom_calls_count_as_matmul_flops():
  """On GPU XLA lowers dots to cuBLAS custom calls; their FLOPs count like dots."""
  from jaxrec.perf import hlo
  text = """HloModule m

ENTRY %main (p0: f32[64,128], p1: f32[128,32]) -> f32[64,32] {
  %p0 = f32[64,128]{1,0} parameter(0)
  %p1 = f32[128,32]{1,0} parameter(1)
  %gemm = (f32[64,32]{1,0}, s8[1024]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %dot = f32[64,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %out = f32[64,32]{1,0} get-tuple-element(%gemm), index=0
}
"""
  assert hlo.dot_flops(text) == 2 * (2.0 * 64 * 32 * 128)
