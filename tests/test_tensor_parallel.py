"""Tensor parallelism and the vocab-parallel item table vs the 1-device reference."""

import jax
import numpy as np
import pytest

from experiments.configs import quickstart
from jaxrec.mesh import make_mesh
from jaxrec.models.recommender import ModelConfig, RecommenderFns
from jaxrec.perf import hlo
from jaxrec.perf.comm import abstract_batch, build_program, comm_report
from jaxrec.train import reference
from jaxrec.train.step import TrainProgram
from tests.helpers import RTOL, global_batch, max_rel_diff, program, synthetic_batch, tiny_config

VARIANT = {"model.positions": "rope", "model.mlp": "swiglu", "model.norm": "rmsnorm"}


@pytest.mark.parametrize("spec, overrides", [
    ("tensor:2", {}), ("tensor:4", {}), ("data:2,tensor:4", {}),
    ("data:2,tensor:4", VARIANT), ("tensor:4,data:2", {"pipeline.microbatches": 2}),
])
def test_loss_and_grads_match_reference(spec, overrides):
  config = tiny_config(**overrides)
  devices = 8 if "data" in spec else int(spec.split(":")[1])
  prog = program(config, spec, devices)
  state = prog.init_state(0)
  params, rng = jax.device_get(state.params), jax.device_get(state.rng)
  host = synthetic_batch(2)
  loss, grads = prog.loss_and_grads(state, global_batch(prog, host))
  ref_loss, ref_grads = reference.loss_and_grads(prog.fns, params, host, rng=rng, step=0)
  assert float(loss) == pytest.approx(float(ref_loss), rel=RTOL)
  assert max_rel_diff(jax.device_get(grads), ref_grads) < RTOL


def test_catalogue_with_padding_shards():
  """90 items -> 128 rows over tensor:4: shard 2 is part padding, shard 3 all padding.
  Every valid id (incl. the last, next to the padding) embeds and scores correctly,
  and padded rows get no gradient, so they stay zero through training."""
  config = tiny_config()
  fns = RecommenderFns(ModelConfig.from_config(config.model, 90, config.data.max_len))
  prog = TrainProgram(config, fns, make_mesh("data:2,tensor:4"))
  host = synthetic_batch(3, num_items=90)
  host["inputs"][0, -3:] = [89, 90, 1]
  host["targets"][0, -4:-1] = [89, 90, 1]
  state = prog.init_state(0)
  params, rng = jax.device_get(state.params), jax.device_get(state.rng)
  loss, grads = prog.loss_and_grads(state, global_batch(prog, host))
  ref_loss, ref_grads = reference.loss_and_grads(fns, params, host, rng=rng, step=0)
  assert float(loss) == pytest.approx(float(ref_loss), rel=RTOL)
  assert max_rel_diff(jax.device_get(grads), ref_grads) < RTOL
  table_grad = np.asarray(jax.device_get(grads)["items"]["table"])
  assert np.all(table_grad[91:] == 0) and np.all(table_grad[0] == 0)
  for step in range(2):
    state, _ = prog.train_step(state, global_batch(prog, synthetic_batch(step, num_items=90)))
  table = np.asarray(jax.device_get(state.params)["items"]["table"])
  assert np.all(table[91:] == 0) and np.all(table[0] == 0)


def compiled_collectives(config, spec):
  prog = program(config, spec)
  compiled = prog.jitted_train_step().lower(prog.abstract_state(), abstract_batch(prog)).compile()
  return prog, hlo.collectives(compiled.as_text(), prog.mesh)


@pytest.mark.parametrize("micro", [1, 2])
def test_tensor_allreduce_count_matches_megatron_formula(micro):
  """Per layer 2 forward + 2 backward all-reduces of the [B, T, D] activations, plus
  the embedding lookup (forward) and the tied head's input gradient (backward)."""
  config = tiny_config(**{"pipeline.microbatches": micro, "model.n_layers": 3})
  prog, colls = compiled_collectives(config, "data:2,tensor:4")
  act_shape = (config.train.batch_size // 2 // micro, config.data.max_len, config.model.d_model)
  # XLA's combiner may fuse independent all-reduces into one tuple, and the head's
  # gradient is [B*T, D]: count activation-sized buffers.
  act = int(np.prod(act_shape))
  count = sum(c.count * sum(int(np.prod(s)) == act for s in c.shapes) for c in colls
              if c.axes == ("tensor",) and c.kind == "all-reduce")
  assert count == micro * (4 * config.model.n_layers + 2)
  # and nothing else of activation size crosses the tensor axis
  assert not [c for c in colls if c.axes == ("tensor",) and c.kind != "all-reduce"]


def test_no_collective_moves_the_whole_table_or_full_logits():
  config = tiny_config()
  prog, colls = compiled_collectives(config, "data:2,tensor:4")
  rows = prog.fns.cfg.table_rows            # 384 rows, 96 per tensor shard
  tokens = config.train.batch_size // 2 * config.data.max_len
  for c in colls:
    for shape in c.shapes:
      assert rows not in shape, (c.kind, c.axes, shape)          # the whole table
      assert np.prod(shape) < tokens * rows, (c.kind, c.axes, shape)  # full logits


def test_comm_report_on_quickstart_matches_analytic():
  config = quickstart.get_config()
  config.mesh = "data:2,tensor:4"
  config.model.n_heads = 4
  report = comm_report(build_program(config, num_items=9724))
  assert set(report["analytic_bytes_by_axis"]) == {"data", "tensor"}
  for axis, ratio in report["measured_over_analytic"].items():
    assert ratio == pytest.approx(1.0, abs=0.01), axis
  assert report["flops"] > 0 and report["peak_memory_bytes"] > 0
  kinds = {(c["kind"], tuple(c["axes"])) for c in report["collectives"]}
  assert ("all-reduce", ("tensor",)) in kinds and ("all-reduce", ("data",)) in kinds


def test_comm_report_command_line(tmp_path):
  import json
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, "-m", "experiments.comm_report", "--cpu_devices=8",
       "--config.mesh=data:4,tensor:2", f"--out={tmp_path}"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "comm_report.json").read_text())
  for key in ("collectives", "bytes_by_axis", "flops", "peak_memory_bytes",
              "analytic_bytes_by_axis"):
    assert key in report
  assert {"kind", "axes", "bytes", "count"} <= set(report["collectives"][0])
  assert "measured" in result.stdout and "tensor" in result.stdout
