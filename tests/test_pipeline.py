"""Pipeline schedules (tables) and the SPMD executor vs the 1-device reference."""

import itertools

import jax
import numpy as np
import pytest

from jaxrec.config import ConfigError, validate
from jaxrec.mesh import MeshShape
from jaxrec.parallel.pipeline import (PipelineConfigError, Schedule, StageLayout,
                                      parse_layers_per_stage)
from jaxrec.perf import hlo
from jaxrec.perf.comm import abstract_batch, comm_report
from jaxrec.train import reference
from tests.helpers import RTOL, global_batch, max_rel_diff, program, synthetic_batch, tiny_config

GRID = [(p, m, name, v) for p, m in itertools.product((2, 4), (4, 8))
        for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2))]


@pytest.mark.parametrize("p, m, name, v", GRID)
def test_schedule_tables_are_complete_causal_and_match_theory(p, m, name, v):
  s = Schedule(name, p, m, v)
  assert s.bubble_fraction() == pytest.approx(s.theory_bubble(), abs=1e-12)
  done = {}
  for t, row in enumerate(s.ops):
    for d, op in enumerate(row):
      if op is None:
        continue
      assert s.device_of(op.stage) == d
      key = (op.kind, op.mb, op.stage)
      assert key not in done
      if op.kind == "F" and op.stage > 0:
        assert done[("F", op.mb, op.stage - 1)] < t
      if op.kind == "B":
        assert done[("F", op.mb, op.stage)] < t
        if op.stage < s.stages - 1:
          assert done[("B", op.mb, op.stage + 1)] < t
    for d, op in enumerate(row):
      if op:
        done[(op.kind, op.mb, op.stage)] = t
  assert len(done) == 2 * m * s.stages
  if name == "gpipe":
    assert s.num_slots == m
  if name == "1f1b":
    assert s.num_slots <= p  # at most p microbatches of activations alive per stage
  rows = s.rows()
  assert len(rows) == 2 * m * s.stages
  assert all(s.ops[t][d].kind == kind and s.ops[t][d].mb == i for t, d, kind, i, _ in rows)


def test_slot_layout_round_trips_and_pads_uneven_stages():
  layout = StageLayout.build(5, 2, 1, (3, 2))
  assert layout.slot_layer().tolist() == [0, 1, 2, 3, 4, -1]
  x = {"w": np.arange(5 * 3, dtype=np.float32).reshape(5, 3)}
  slots = layout.to_slots(x)
  assert np.asarray(slots["w"][5]).tolist() == [0, 0, 0]
  np.testing.assert_array_equal(np.asarray(layout.to_canonical(slots)["w"]), x["w"])
  inter = StageLayout.build(4, 2, 2)   # virtual stage s = v*P + d: device 0 holds 0 and 2
  assert inter.slot_layer().tolist() == [0, 2, 1, 3]


def canonical(prog, tree):
  tree = dict(jax.device_get(tree))
  tree["layers"] = jax.device_get(prog.layout.stages.to_canonical(tree["layers"]))
  return tree


def check_against_reference(config, spec):
  devices = int(np.prod([int(part.split(":")[1]) for part in spec.split(",")]))
  prog = program(config, spec, devices)
  state = prog.init_state(0)
  params, rng = canonical(prog, state.params), jax.device_get(state.rng)
  host = synthetic_batch(4)
  loss, grads = prog.loss_and_grads(state, global_batch(prog, host))
  ref_loss, ref_grads = reference.loss_and_grads(prog.fns, params, host, rng=rng, step=0)
  assert float(loss) == pytest.approx(float(ref_loss), rel=RTOL)
  assert max_rel_diff(canonical(prog, grads), ref_grads) < RTOL
  return prog


@pytest.mark.parametrize("spec, overrides", [
    ("pipe:2", {"pipeline.schedule": "gpipe", "pipeline.microbatches": 4}),
    pytest.param("pipe:4", {"pipeline.schedule": "1f1b", "pipeline.microbatches": 4,
                            "model.n_layers": 4}, marks=pytest.mark.slow),
    pytest.param("pipe:2", {"pipeline.schedule": "interleaved", "pipeline.virtual_stages": 2,
                            "pipeline.microbatches": 2, "model.n_layers": 4},
                 marks=pytest.mark.slow),
    pytest.param("data:2,pipe:2,tensor:2", {"pipeline.schedule": "gpipe",
                                            "pipeline.microbatches": 2},
                 marks=pytest.mark.slow),
    ("data:2,pipe:2,tensor:2", {"pipeline.schedule": "1f1b", "pipeline.microbatches": 4}),
    pytest.param("data:2,pipe:2,tensor:2", {"pipeline.schedule": "interleaved",
                                            "pipeline.virtual_stages": 2,
                                            "pipeline.microbatches": 2, "model.n_layers": 4},
                 marks=pytest.mark.slow),
])
def test_every_schedule_matches_reference(spec, overrides):
  check_against_reference(tiny_config(**overrides), spec)


@pytest.mark.parametrize("spec, overrides", [
    pytest.param("pipe:2", {"model.n_layers": 5, "pipeline.layers_per_stage": "3,2",
                            "pipeline.microbatches": 2}, marks=pytest.mark.slow),
    pytest.param("data:2,pipe:4", {"model.n_layers": 6,
                                   "pipeline.layers_per_stage": "[1, 2, 2, 1]",
                                   "pipeline.schedule": "1f1b", "pipeline.microbatches": 4},
                 marks=pytest.mark.slow),
    ("pipe:2,data:2,tensor:2", {"pipeline.remat": "full", "pipeline.microbatches": 2}),
])
def test_uneven_stages_and_remat_match_reference(spec, overrides):
  check_against_reference(tiny_config(**overrides), spec)


@pytest.mark.parametrize("kwargs, needle", [
    ({"n_layers": 5, "pipe": 2, "layers_per_stage": (2, 2)}, "covers 4 layers but the model has 5"),
    ({"n_layers": 4, "pipe": 2, "layers_per_stage": (4, 0)}, "every stage needs >= 1 layer"),
    ({"n_layers": 4, "pipe": 2, "layers_per_stage": (1, 1, 2)}, "has 3 entries"),
    ({"n_layers": 4, "pipe": 2, "virtual": 3}, "do not split evenly over pipe x virtual_stages"),
])
def test_bad_layouts_are_clear_errors(kwargs, needle):
  with pytest.raises(PipelineConfigError, match=needle):
    StageLayout.build(kwargs["n_layers"], kwargs["pipe"], kwargs.get("virtual", 1),
                      kwargs.get("layers_per_stage", "uniform"))


@pytest.mark.parametrize("args, needle", [
    (("interleaved", 4, 6, 2), "divisible by the pipe size"),
    (("gpipe", 2, 4, 2), "needs schedule 'interleaved'"),
    (("zigzag", 2, 4, 1), "valid schedules"),
])
def test_bad_schedules_are_clear_errors(args, needle):
  with pytest.raises(PipelineConfigError, match=needle):
    Schedule(*args)


def test_bad_layer_counts_text_and_microbatches():
  with pytest.raises(PipelineConfigError, match="counts like '3,3,2'"):
    parse_layers_per_stage("three,two")
  assert parse_layers_per_stage("[3, 3, 2]") == (3, 3, 2)
  with pytest.raises(ConfigError, match="microbatches = 3 does not divide"):
    validate(tiny_config(**{"pipeline.microbatches": 3}), MeshShape(pipe=2, data=2))


@pytest.mark.slow
def test_1f1b_holds_less_memory_than_gpipe():
  peaks = {}
  for name in ("gpipe", "1f1b"):
    config = tiny_config(**{"pipeline.schedule": name, "pipeline.microbatches": 8,
                             "model.n_layers": 2, "model.d_model": 32, "model.d_ff": 64,
                             "data.max_len": 16, "train.batch_size": 32, "model.dropout": 0.0})
    prog = program(config, "pipe:2", 2)
    compiled = prog.jitted_train_step().lower(prog.abstract_state(), abstract_batch(prog)).compile()
    peaks[name] = hlo.memory_stats(compiled)["peak_memory_bytes"]
  assert peaks["1f1b"] < 0.8 * peaks["gpipe"], peaks


def test_pipe_axis_bytes_match_the_analytic_volume():
  config = tiny_config(**{"pipeline.microbatches": 4, "pipeline.schedule": "1f1b"})
  report = comm_report(program(config, "data:2,pipe:2,tensor:2"))
  assert not report["unweighted_conditionals"]
  for axis in ("pipe", "tensor", "data"):
    assert report["measured_over_analytic"][axis] == pytest.approx(1.0, abs=0.01), axis
  sends = [c for c in report["collectives"] if c["kind"] == "collective-permute"]
  assert sends and all(c["axes"] == ["pipe"] for c in sends)


@pytest.mark.slow
def test_data_pipe_tensor_trains_the_quickstart_config(tmp_path):
  from experiments.configs import quickstart
  from jaxrec.train.loop import train_and_evaluate
  c = quickstart.get_config()
  c.mesh = "data:2,pipe:2,tensor:2"
  c.pipeline.microbatches = 2
  c.pipeline.schedule = "1f1b"
  c.train.steps = 8
  c.train.batch_size = 32
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.eval.max_users = 32
  c.eval.batch_size = 32
  c.model.d_model = 32
  c.model.d_ff = 64
  summary = train_and_evaluate(c, tmp_path)
  assert summary["mesh"] == "replica:1,data:2,pipe:2,tensor:2"
  assert summary["test"]["users"] == 32
  import json
  losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "loss" in l]
  assert len(losses) == 8 and losses[-1] < losses[0]


VARIANTS = {
    "uneven": {"model.n_layers": 3, "pipeline.layers_per_stage": "2,1"},
    "spread": {"pipeline.head": "spread"},
    "remat": {"pipeline.remat": "full", "model.remat": "full"},
}
SCHEDULE_OVERRIDES = {
    "gpipe": {"pipeline.schedule": "gpipe", "pipeline.microbatches": 2},
    "1f1b": {"pipeline.schedule": "1f1b", "pipeline.microbatches": 4},
    "interleaved": {"pipeline.schedule": "interleaved", "pipeline.virtual_stages": 2,
                    "pipeline.microbatches": 2, "model.n_layers": 4},
}


def _matrix():
  for schedule, base in SCHEDULE_OVERRIDES.items():
    for name, extra in VARIANTS.items():
      overrides = {**base, **extra}
      if schedule == "interleaved" and name == "uneven":
        overrides.update({"model.n_layers": 5, "pipeline.layers_per_stage": "2,1,1,1"})
      quick = (schedule, name) in {("1f1b", "spread"), ("interleaved", "uneven"),
                                   ("gpipe", "remat")}
      yield pytest.param(overrides, id=f"{schedule}-{name}",
                         marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("overrides", list(_matrix()))
def test_every_schedule_with_uneven_spread_and_remat_matches_reference(overrides):
  """The scanned executor on data:2,pipe:2,tensor:2, each schedule x {uneven stages,
  the spread head, remat} against the 1-device reference (fp32, 1e-5). Three run in
  the default suite, the rest under -m slow."""
  check_against_reference(tiny_config(**overrides), "data:2,pipe:2,tensor:2")


def test_pipe_2_with_the_spread_head_matches_reference():
  check_against_reference(tiny_config(**{"pipeline.head": "spread",
                                         "pipeline.microbatches": 4}), "pipe:2")


def hlo_ops(config, spec, devices):
  prog = program(config, spec, devices)
  lowered = prog.jitted_train_step().lower(prog.abstract_state(), abstract_batch(prog))
  text = lowered.compile().as_text()
  return sum(1 for line in text.splitlines() if " = " in line and "%" in line)


@pytest.mark.slow
def test_program_size_does_not_grow_with_microbatches():
  """The schedule is data walked by one scan: pipe:4 1F1B with 16 microbatches
  compiles to (nearly) the same program as with 4 (compile-only)."""
  base = {"pipeline.schedule": "1f1b", "model.n_layers": 4, "train.batch_size": 64,
          "model.dropout": 0.0}
  small = hlo_ops(tiny_config(**base, **{"pipeline.microbatches": 4}), "pipe:4", 4)
  large = hlo_ops(tiny_config(**base, **{"pipeline.microbatches": 16}), "pipe:4", 4)
  assert large <= 1.2 * small, (small, large)
