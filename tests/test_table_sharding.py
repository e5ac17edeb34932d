"""The item table split over data x tensor (ZeRO for the table): same results as the
reference, sparse row-gradient exchange, row-wise optimizers, restore across shardings."""

import jax
import numpy as np
import pytest

from jaxrec.mesh import make_mesh
from jaxrec.models.recommender import RecommenderFns
from jaxrec.perf import hlo
from jaxrec.perf.comm import abstract_batch, comm_report
from jaxrec.train.checkpoint import Checkpointer
from jaxrec.train.loop import restore
from jaxrec.train.step import TrainProgram
from tests.helpers import (assert_steps_match_reference, global_batch, program,
                           synthetic_batch, tiny_config)
from tests.test_pipeline import canonical

ROWS = {"embedding.sharding": "rows"}


@pytest.mark.parametrize("spec, overrides", [
    ("data:8", {}),
    ("data:4,tensor:2", {"pipeline.microbatches": 2}),
    pytest.param("data:2,pipe:2,tensor:2", {"pipeline.schedule": "1f1b",
                                            "pipeline.microbatches": 2},
                 marks=pytest.mark.slow),
    # rows over data only, copied over replica: the copies' gradients are summed there
    ("replica:2,data:2,tensor:2", {}),
    pytest.param("replica:2,data:4", {"embedding.shard_replica": True}, marks=pytest.mark.slow),
])
def test_rows_sharding_updates_match_the_reference(spec, overrides):
  """Two AdamW steps (clipping, dropout): loss, and the params after, within 1e-5."""
  config = tiny_config(**ROWS, **overrides)
  prog = program(config, spec)
  assert "data" in prog.layout.table_axes
  assert_steps_match_reference(prog, config, 2, canon=lambda p: canonical(prog, p))


def test_rows_sharding_keeps_the_table_and_its_moments_once_per_replica_group():
  dense = program(tiny_config(), "data:4,tensor:2")
  rows = program(tiny_config(**ROWS), "data:4,tensor:2")
  for prog, split in ((dense, 2), (rows, 8)):
    state = prog.init_state(0)
    table = state.params["items"]["table"]
    mu = state.opt_state[0].mu["items"]["table"]
    assert table.addressable_shards[0].data.shape[0] == table.shape[0] // split
    assert mu.addressable_shards[0].data.shape[0] == table.shape[0] // split


def test_no_table_sized_all_reduce_crosses_data_with_rows_sharding():
  """The table's gradient travels as (unique ids, rows): the compiled step has no
  all-reduce of a [rows, D]-sized buffer over data, and its data-axis table bytes
  are the all-gather of the rows the batch looked up."""
  def collectives(config):
    fns = RecommenderFns.from_config(config, 5000)   # a table larger than the activations
    prog = TrainProgram(config, fns, make_mesh("data:4,tensor:2"))
    compiled = prog.jitted_train_step().lower(prog.abstract_state(),
                                             abstract_batch(prog)).compile()
    return prog, hlo.collectives(compiled.as_text(), prog.mesh, prog.branch_weights())

  prog, colls = collectives(tiny_config(**ROWS))
  rows, d = prog.fns.cfg.table_rows, prog.fns.cfg.d_model
  table_sized = [c for c in colls if "data" in c.axes
                 and any(np.prod(s) >= rows // 8 * d for s in c.shapes)]
  assert not table_sized, [(c.kind, c.axes, c.shapes) for c in table_sized]
  _, dense = collectives(tiny_config())
  assert any(c.kind == "all-reduce" and c.axes == ("data",)
             and any(tuple(s) == (rows // 2, d) for s in c.shapes) for c in dense)


def test_head_reduce_scatters_the_hidden_state_gradient_to_its_owners():
  """Every rows shard scores every data replica's tokens; each device needs only its
  own tokens' hidden-state gradient, so the shards' partial sums are reduce-scattered
  over data (summed over tensor first), never all-reduced: half the wire bytes of
  the head's biggest collective (the reference equivalence is the test above)."""
  config = tiny_config(**ROWS)
  prog = TrainProgram(config, RecommenderFns.from_config(config, 5000),
                      make_mesh("data:4,tensor:2"))
  compiled = prog.jitted_train_step().lower(prog.abstract_state(),
                                           abstract_batch(prog)).compile()
  colls = hlo.collectives(compiled.as_text(), prog.mesh, prog.branch_weights())
  d = prog.fns.cfg.d_model
  tokens = config.train.batch_size * config.data.max_len // 4   # per data replica
  gathered = (4 * tokens, d)
  assert not [c for c in colls if c.kind == "all-reduce" and "data" in c.axes
              and gathered in map(tuple, c.shapes)]
  assert any(c.kind == "all-reduce" and c.axes == ("tensor",)
             and gathered in map(tuple, c.shapes) for c in colls)
  scattered = [c for c in colls if c.kind == "reduce-scatter" and c.axes == ("data",)
               and (tokens, d) in map(tuple, c.shapes)]
  assert len(scattered) == 2, colls   # the lookup's rows and the head's gradient


def numpy_lazy_adam(table, mu, nu, g, count, lr, b1=0.9, b2=0.98, eps=1e-8, wd=0.01):
  on = np.any(g != 0, axis=-1, keepdims=True)
  mu = np.where(on, b1 * mu + (1 - b1) * g, mu)
  nu = np.where(on, b2 * nu + (1 - b2) * g * g, nu)
  update = -lr * (mu / (1 - b1 ** count) / (np.sqrt(nu / (1 - b2 ** count)) + eps) + wd * table)
  return table + np.where(on, update, 0.0), mu, nu


def test_lazy_adam_matches_numpy_and_leaves_untouched_rows_alone():
  config = tiny_config(**ROWS, **{"embedding.optimizer": "lazy_adam", "train.grad_clip": 0.0,
                                  "model.dropout": 0.0, "loss.type": "sampled",
                                  "loss.num_negatives": 4, "loss.shared_negatives": True})
  prog = program(config, "data:4,tensor:2")
  state = prog.init_state(0)
  table = np.asarray(jax.device_get(state.params["items"]["table"]), np.float64)
  start = table.copy()
  mu = np.zeros_like(table)
  nu = np.zeros_like(table)
  untouched = np.ones(table.shape[0], bool)
  for step in range(3):
    batch = global_batch(prog, synthetic_batch(10 + step))
    _, grads = prog.loss_and_grads(state, batch)
    g = np.asarray(jax.device_get(grads["items"]["table"]), np.float64)
    untouched &= ~np.any(g != 0, axis=-1)
    table, mu, nu = numpy_lazy_adam(table, mu, nu, g, step + 1, prog.learning_rate(step),
                                    wd=config.train.weight_decay)
    state, _ = prog.train_step(state, batch)
  got = np.asarray(jax.device_get(state.params["items"]["table"]))
  np.testing.assert_allclose(got, table, rtol=1e-5, atol=1e-7)
  # the sampled loss leaves most rows without a gradient: they keep their exact values
  assert 0 < untouched.sum() < table.shape[0]
  np.testing.assert_array_equal(got[untouched], start[untouched].astype(np.float32))
  mu_got = np.asarray(jax.device_get(state.opt_state.inner_states["table"].inner_state.mu
                                     ["items"]["table"]))
  assert not mu_got[untouched].any()


def test_rowwise_adagrad_keeps_one_accumulator_per_row():
  config = tiny_config(**ROWS, **{"embedding.optimizer": "rowwise_adagrad"})
  prog = program(config, "data:4,tensor:2")
  state = prog.init_state(0)
  table = state.params["items"]["table"]
  inner = state.opt_state.inner_states["table"].inner_state
  acc = inner[0].sum_sq["items"]["table"]
  assert acc.shape == (table.shape[0], 1)
  assert acc.addressable_shards[0].data.shape[0] == table.shape[0] // 8
  state, metrics = prog.train_step(state, global_batch(prog, synthetic_batch(3)))
  acc = state.opt_state.inner_states["table"].inner_state[0].sum_sq["items"]["table"]
  assert np.isfinite(float(metrics["loss"])) and float(np.asarray(acc).max()) > 0


def test_checkpoint_restores_from_tensor_to_rows_on_another_mesh(tmp_path):
  first = program(tiny_config(), "data:2,tensor:4")
  state, _ = first.train_step(first.init_state(0), global_batch(first, synthetic_batch(4)))
  ckpt = Checkpointer(tmp_path / "ck", async_save=False)
  from jaxrec.train.loop import checkpoint_meta
  ckpt.save(1, state, checkpoint_meta(first, 1))
  second = program(tiny_config(**ROWS), "data:4,tensor:2")
  restored = restore(ckpt, 1, second)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                  jax.tree.leaves(jax.device_get(restored.params))):
    np.testing.assert_array_equal(a, b)
  assert "data" in str(restored.params["items"]["table"].sharding.spec)
  ckpt.close()


def test_comm_report_lists_the_table_exchange_on_its_own_line():
  config = tiny_config(**ROWS)
  report = comm_report(program(config, "data:4,tensor:2"))
  table = report["table_exchange"]
  assert table["measured_wire_bytes"] > 0
  assert table["measured_wire_bytes"] == pytest.approx(table["analytic_wire_bytes"], rel=0.1)


@pytest.mark.parametrize("payload, tol", [pytest.param("bf16", 2 ** -8, marks=pytest.mark.slow),
                                          ("int8", 1 / 127)])
def test_compressed_row_gradients_are_close_and_move_fewer_bytes(payload, tol):
  """embedding.row_gradients compresses only the rows' gradient all-gather: the loss
  is unchanged, the table gradient is within the codec's rounding (bf16: 2^-8
  relative; int8: half a step of one scale per row), every other gradient is exact,
  and the table exchange moves fewer bytes (measured from the HLO, as predicted)."""
  exact_cfg = tiny_config(**ROWS)
  small_cfg = tiny_config(**ROWS, **{"embedding.row_gradients": payload})
  exact, small = program(exact_cfg, "data:4,tensor:2"), program(small_cfg, "data:4,tensor:2")
  state = exact.init_state(0)
  batch = global_batch(exact, synthetic_batch(1))
  loss_a, grads_a = jax.device_get(exact.loss_and_grads(state, batch))
  loss_b, grads_b = jax.device_get(small.loss_and_grads(state, batch))
  assert float(loss_b) == float(loss_a)
  table_a, table_b = grads_a["items"]["table"], grads_b["items"]["table"]
  assert np.any(table_a != table_b)                   # the codec really ran
  row_max = np.max(np.abs(table_a), axis=-1, keepdims=True)
  # a row's gradient sums the looked-up copies of it (each rounded once)
  assert np.all(np.abs(table_b - table_a) <= tol * (row_max + 1e-12) * 8)
  assert np.max(np.abs(table_b - table_a)) <= tol * np.max(np.abs(table_a))
  rest = lambda g: [x for p, x in jax.tree_util.tree_flatten_with_path(g)[0]
                    if "table" not in jax.tree_util.keystr(p)]
  for a, b in zip(rest(grads_a), rest(grads_b)):
    np.testing.assert_array_equal(a, b)
  full, packed = (comm_report(p)["table_exchange"] for p in (exact, small))
  assert packed["measured_wire_bytes"] < full["measured_wire_bytes"]
  assert packed["measured_wire_bytes"] == pytest.approx(packed["analytic_wire_bytes"], rel=0.1)


def test_row_gradients_without_rows_sharding_is_a_clear_error():
  from jaxrec.config import ConfigError, validate
  from jaxrec.mesh import MeshShape
  with pytest.raises(ConfigError, match="row_gradients = 'int8'.*embedding.sharding = 'rows'"):
    validate(tiny_config(**{"embedding.row_gradients": "int8"}), MeshShape(data=8))


def test_hybrid_local_modes_keep_the_table_synchronous_and_sparse():
  """rows + local SGD: the table has no per-replica copy (params or moments), its
  sparse exchange runs every step, and only the dense layers' average is 1/H."""
  every = 4
  sync = program(tiny_config(**ROWS), "data:4,tensor:2")
  hybrid = program(tiny_config(**ROWS, **{"dp.mode": "local_sgd", "dp.sync_every": every}),
                   "data:4,tensor:2")
  state = hybrid.init_state(0)
  assert state.dp_state["local_params"]["items"]["table"] is None
  mu = state.dp_state["local_opt"][0].mu["items"]["table"]
  assert mu.addressable_shards[0].data.shape[0] == mu.shape[0] // 8
  layer = state.dp_state["local_params"]["layers"]
  assert all(x.shape[0] == 4 for x in jax.tree.leaves(layer))   # one copy per replica
  sync_report, hybrid_report = comm_report(sync), comm_report(hybrid)
  assert (hybrid_report["table_exchange"]["measured_wire_bytes"] ==
          sync_report["table_exchange"]["measured_wire_bytes"])
  dense = sync.layout.grad_sync.analytic_bytes()["data"][1]   # ring wire bytes per sync
  saved = (sync_report["wire_bytes_by_axis"]["data"] -
           hybrid_report["wire_bytes_by_axis"]["data"])
  assert saved == pytest.approx(dense * (1 - 1 / every), rel=0.01)


def test_hybrid_with_a_replica_axis_needs_the_table_split_over_it_too():
  from jaxrec.config import ConfigError, validate
  from jaxrec.mesh import MeshShape
  config = tiny_config(**ROWS, **{"dp.mode": "diloco"})
  with pytest.raises(ConfigError, match="replica = 2.*shard_replica = True"):
    validate(config, MeshShape(replica=2, data=4))
  config.embedding.shard_replica = True
  validate(config, MeshShape(replica=2, data=4))


def test_hybrid_checkpoint_restores_onto_another_mesh(tmp_path):
  """rows + DiLoCo from data:4,tensor:2 to data:8: the anchor comes back as saved,
  the table's one Adam state as saved, the dense layers' replicas as their mean."""
  hybrid = {**ROWS, "dp.mode": "diloco", "dp.sync_every": 4}
  first = program(tiny_config(**hybrid), "data:4,tensor:2")
  state = first.init_state(0)
  for seed in (4, 5):   # two local steps: the replicas differ, no average yet
    state, _ = first.train_step(state, global_batch(first, synthetic_batch(seed)))
  ckpt = Checkpointer(tmp_path / "ck", async_save=False)
  from jaxrec.train.loop import checkpoint_meta
  ckpt.save(2, state, checkpoint_meta(first, 2))
  second = program(tiny_config(**hybrid), "data:8")
  restored = restore(ckpt, 2, second)
  saved, got = jax.device_get(state), jax.device_get(restored)
  np.testing.assert_array_equal(saved.params["items"]["table"], got.params["items"]["table"])
  table_mu = lambda s: s.dp_state["local_opt"][0].mu["items"]["table"]  # noqa: E731
  np.testing.assert_array_equal(table_mu(saved), table_mu(got))
  saved_ff = saved.dp_state["local_params"]["layers"]["mlp"]["w_in"]
  assert not np.allclose(saved_ff[0], saved_ff[1])
  got_ff = got.dp_state["local_params"]["layers"]["mlp"]["w_in"]
  assert got_ff.shape[0] == 8
  np.testing.assert_allclose(got_ff, np.broadcast_to(saved_ff.mean(0), got_ff.shape),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got.params["layers"]["mlp"]["w_in"], saved_ff.mean(0),
                             rtol=1e-6, atol=1e-7)
  state, _ = second.train_step(restored, global_batch(second, synthetic_batch(6)))
  ckpt.close()
