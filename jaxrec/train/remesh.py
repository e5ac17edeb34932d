"""Restoring a checkpoint written on another mesh (or pipeline layout).

The saved run's own state layout is rebuilt from its recorded config and mesh
shape on an AbstractMesh (no devices needed), its arrays are read replicated onto
the current mesh, and a jitted conversion with the new state's out_shardings
moves them into the new layout:

  params, optimizer moments   stacked layers re-laid from the saved stage layout
                              to the new one (exact)
  step, RNG                   as saved
  local_sgd / diloco replicas averaged into one copy and broadcast (an early
                              synchronisation: no replica's progress is dropped)
  delayed-mode pending grads  kept when the per-device layout fits, else dropped
                              (one step's gradient)
  compressor state            kept when its per-device shapes still fit, else
                              re-initialised (error feedback restarts at zero)
What could not be carried over exactly is logged as a warning.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from jaxrec.config import saved_config
from jaxrec.mesh import AXES, MeshShape
from jaxrec.parallel.pipeline import StageLayout
from jaxrec.train.state import TrainState
from jaxrec.train.step import TrainProgram


def saved_program(program: TrainProgram, meta: dict[str, Any]) -> TrainProgram:
  """The TrainProgram the checkpoint was written by, on an abstract mesh. Its stage
  split and head placement are the recorded ones (an "auto" split is not solved
  again: the devices it was measured on may be gone)."""
  config = saved_config(json.loads(meta["config"]))
  sizes = parse_mesh(meta["mesh"])
  if sizes.pipe > 1 and "layers_per_stage" in meta:
    config.pipeline.layers_per_stage = ",".join(str(c) for c in meta["layers_per_stage"])
    if "head" in meta:
      config.pipeline.head = meta["head"]
  mesh = AbstractMesh(sizes.sizes, AXES)
  return TrainProgram(config, program.fns, mesh)


def parse_mesh(text: str) -> MeshShape:
  return MeshShape(**{k: int(v) for k, v in (p.split(":") for p in text.split(","))})


def same_layout(program, old) -> bool:
  new_shapes = jax.eval_shape(program.init_state, 0)
  old_shapes = jax.eval_shape(old.init_state, 0)
  same_tree = jax.tree.structure(new_shapes) == jax.tree.structure(old_shapes)
  return same_tree and all(a.shape == b.shape for a, b in zip(
      jax.tree.leaves(new_shapes), jax.tree.leaves(old_shapes))) and (
      program.shape == old.shape and program.layout.stages == old.layout.stages and
      program.layout.head_spread == old.layout.head_spread)


def replicated_targets(program, old) -> TrainState:
  """The saved state's shapes, each replicated on the current mesh."""
  sharding = NamedSharding(program.mesh, P())
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      jax.eval_shape(old.init_state, 0))


def convert(program, old, saved: TrainState) -> TrainState:
  """Moves a state saved by `old` into `program`'s layout and shardings."""
  notes: list[str] = []

  def relayout_layers(tree: Any, old_layout: StageLayout, lead: int = 0) -> Any:
    """Re-lays every leaf under a 'layers' key (axis `lead` is the slot axis)."""
    def leaf(path, x):
      if not any(getattr(k, "key", None) == "layers" for k in path):
        return x
      moved = jnp.moveaxis(x, lead, 0)
      moved = program.layout.stages.to_slots(old_layout.to_canonical(moved))
      return jnp.moveaxis(moved, 0, lead)
    return jax.tree_util.tree_map_with_path(leaf, tree)

  def fresh() -> TrainState:
    return jax.eval_shape(program.init_state, 0)

  target = fresh()

  def build(saved: TrainState) -> TrainState:
    params = relayout_layers(saved.params, old.layout.stages)
    new = program.init_state_from(params, saved.rng, saved.step)
    opt_state = new.opt_state
    if not program.dp.local and not old.dp.local:
      opt_state = relayout_layers(saved.opt_state, old.layout.stages)
    dp_state = new.dp_state
    if (program.dp.mode == old.dp.mode == "delayed" and
        _same_shapes(saved.dp_state, target.dp_state)):
      dp_state = saved.dp_state
    if program.dp.local and old.dp.local:
      replicas, local_opt = old.dp.collapse(saved.params, saved.dp_state)
      replicas = relayout_layers(replicas, old.layout.stages)
      local_opt = relayout_layers(local_opt, old.layout.stages)
      anchor = replicas
      dp_state = dict(new.dp_state)
      dp_state.update(program.dp.replicate(replicas, local_opt))
      if "outer_opt" in dp_state and "outer_opt" in saved.dp_state:
        dp_state["outer_opt"] = relayout_layers(saved.dp_state["outer_opt"], old.layout.stages)
      new = new.replace(params=anchor)
    comp_state = new.comp_state
    if _same_shapes(saved.comp_state, target.comp_state):
      comp_state = saved.comp_state
    return new.replace(opt_state=opt_state, dp_state=dp_state, comp_state=comp_state)

  if not _same_shapes(saved.comp_state, target.comp_state):
    notes.append("compressor state re-initialised (its per-device layout changed)")
  if (program.dp.mode == old.dp.mode == "delayed" and
      not _same_shapes(saved.dp_state, target.dp_state)):
    notes.append("delayed-mode pending gradient (one step's) dropped: its per-device "
                 "layout changed")
  if program.dp.local and old.dp.local and old.shape != program.shape:
    notes.append("local replicas averaged into one copy (an early synchronisation)")
  if program.dp.mode != old.dp.mode:
    notes.append(f"data-parallel mode changed {old.dp.mode} -> {program.dp.mode}: its "
                 "state starts fresh")
  for note in notes:
    logging.warning("restoring onto mesh %s from %s: %s", program.shape, old.shape, note)
  return jax.jit(build, out_shardings=program.state_shardings)(saved)


def _same_shapes(a: Any, b: Any) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(x.shape == y.shape for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
