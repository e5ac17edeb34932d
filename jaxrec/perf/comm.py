"""Communication report of a config's compiled train step (no arrays are created).

The step is lowered from abstract inputs carrying the mesh's shardings, so large
models can be accounted for on a laptop: only compilation runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxrec.config import validate
from jaxrec.mesh import make_mesh, mesh_shape
from jaxrec.models.recommender import RecommenderFns
from jaxrec.models.embedding import TABLE_EXCHANGE_SCOPE
from jaxrec.perf import analytic, hlo, strategy
from jaxrec.train.step import TrainProgram


def abstract_batch(program: TrainProgram) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch as the input pipeline makes it for this config: segment
  ids when rows are packed, timestamps when the model reads them (HSTU's time bias)."""
  c = program.config
  shape = (c.train.batch_size, c.data.max_len)
  sharding = program.batch_sharding(2)
  keys = ["inputs", "targets"]
  if c.data.packing == "greedy":
    keys.append("segments")
  if program.fns.uses_time:
    keys += ["timestamps", "target_times"]
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in keys}


def build_program(config: ml_collections.ConfigDict, num_items: int,
                  devices: Sequence[jax.Device] | None = None) -> TrainProgram:
  """The config's program on `devices` (default: all of them)."""
  mesh = make_mesh(config.mesh, devices)
  validate(config, mesh_shape(mesh))
  fns = RecommenderFns.from_config(config, num_items)
  return TrainProgram(config, fns, mesh)


def lower_step(program: TrainProgram):
  return program.jitted_train_step().lower(program.abstract_state(), abstract_batch(program))


def compile_step(program: TrainProgram):
  return lower_step(program).compile()


def comm_report(program: TrainProgram) -> dict[str, Any]:
  """Measured collectives (from the compiled HLO) next to the analytic volumes."""
  lowered = lower_step(program)
  compiled = lowered.compile()
  # bytes at the program's dtypes: a CPU compile computes bf16 collectives in f32
  report = hlo.analyze(compiled, program.mesh, program.branch_weights(),
                       scopes=(TABLE_EXCHANGE_SCOPE,),
                       program_text=lowered.as_text(dialect="hlo", debug_info=True))
  c = program.config
  shape = mesh_shape(program.mesh)
  lay = program.layout
  payload, wire = strategy.analytic_volumes(lay)
  report["analytic_bytes_by_axis"] = payload
  report["analytic_wire_bytes_by_axis"] = wire
  report["measured_over_analytic"] = _ratios(report["bytes_by_axis"], payload)
  report["measured_over_analytic_wire"] = _ratios(report["wire_bytes_by_axis"], wire)
  key, table_payload, table_wire = strategy.table_exchange(lay)
  if table_wire:
    report["table_exchange"] = {
        "axes": key, "analytic_wire_bytes": table_wire,
        "measured_wire_bytes": report["wire_bytes_by_scope"][TABLE_EXCHANGE_SCOPE],
        "note": "rows-sharded table: ids all-gathered, rows reduce-scattered, row gradients "
                "all-gathered to their owners; buffers sized by the ids looked up"}
  report["mesh"] = str(shape)
  report["strategy"] = {"dp_mode": c.dp.mode, "sync_every": program.dp.every,
                        "compression": c.compression.method,
                        "hierarchical": lay.grad_sync.hierarchical,
                        "pipeline": (f"{c.pipeline.schedule} x{c.pipeline.microbatches}"
                                     if lay.pipe_axis else "none"),
                        "layers_per_stage": list(lay.stages.layers_per_stage),
                        "head": "spread" if lay.head_spread else "last"}
  report["num_params"] = program.fns.num_params()
  report["param_bytes_per_device"] = analytic.shard_bytes(
      lay.param_shapes, lay.param_specs, shape)
  report["device"] = f"{program.mesh.size}x {jax.devices()[0].device_kind} (compiled only)"
  return report


def _ratios(measured: dict[str, float], expected: dict[str, float]) -> dict[str, float | None]:
  return {axis: (measured.get(axis, 0.0) / value if value else None)
          for axis, value in expected.items()}


def format_report(report: dict[str, Any]) -> str:
  lines = [f"mesh {report['mesh']}  params {report['num_params'] / 1e6:.2f}M  "
           f"per-device FLOPs/step {report['flops']:.3e}  peak memory "
           f"{report['peak_memory_bytes'] / 2**20:.1f} MiB",
           "", f"{'kind':<20}{'axes':<16}{'count':>7}{'bytes each':>16}{'bytes/step':>16}"]
  for c in report["collectives"]:
    if not c["axes"]:
      continue
    cond = " (unweighted branch)" if c["in_conditional"] else ""
    lines.append(f"{c['kind']:<20}{','.join(c['axes']):<16}{c['count']:>7.2f}"
                 f"{c['bytes']:>16,}{c['total_bytes']:>16,.0f}{cond}")
  lines += ["", "bytes per step by axis (buffers as counted in HLO; wire = ring model)",
            f"{'axis':<16}{'measured':>16}{'analytic':>16}{'ratio':>7}"
            f"{'wire meas.':>16}{'wire anal.':>16}{'ratio':>7}"]
  axes = sorted(set(report["bytes_by_axis"]) | set(report["analytic_bytes_by_axis"]))
  for axis in axes:
    cells = []
    for measured, expected in (("bytes_by_axis", "analytic_bytes_by_axis"),
                               ("wire_bytes_by_axis", "analytic_wire_bytes_by_axis")):
      m = report[measured].get(axis, 0.0)
      a = report[expected].get(axis)
      ratio = f"{m / a:7.3f}" if a else "      -"
      cells.append(f"{m:>16,.0f}{(a or 0):>16,.0f}{ratio}")
    lines.append(f"{axis:<16}{''.join(cells)}")
  table = report.get("table_exchange")
  if table:
    lines += ["", f"rows-sharded item table over {table['axes']}: lookup + sparse row-gradient "
              f"exchange {table['measured_wire_bytes']:,.0f} B/step measured (wire), "
              f"{table['analytic_wire_bytes']:,.0f} analytic (buffers sized by the ids looked "
              "up; no dense all-reduce of the table)"]
  return "\n".join(lines)
