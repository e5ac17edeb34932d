"""The pipeline executor: one `lax.scan` over a schedule's ticks, inside shard_map.

The schedule's table is device data ([ticks, pipe] int32 arrays), so the program
holds one tick body whatever the number of microbatches: compile time and HLO size
do not grow with M. At each tick every device reads its own row (by
`axis_index('pipe')`) and runs `lax.switch` on its op:

  F_first / F / F_last   forward of (microbatch, chunk): stage 0 embeds first; the
                         last stage also runs the item head, which returns the
                         loss, the cotangent of its input (so its backward can start
                         at once) and what the item table's gradient needs later
  B_first / B            backward from the stored residuals; stage 0 also returns
                         the embedding's gradient (looked-up rows, not the table)
  idle                   nothing

then one `ppermute` forward and one backward move activations and cotangents. The
senders differ per tick; the tick's sender pattern (the same on every device) picks
one of a few `ppermute`s that list exactly those senders, so the wire carries only
what the schedule moves.

What a forward keeps for its backward is what `jax.vjp` says it needs: the VJP's
*opaque* residuals (named and limited by the stage's `jax.checkpoint` policy) are
stored per slot; the primal inputs it reuses (params, the stage input, token ids)
are not stored but handed back at the backward from where they live anyway.

Per-slot buffers, gradient accumulators and per-microbatch outputs never pass
through a conditional: a tick reads one slot before the switch, the branch returns
what to write, and the write happens after it (to a spare slot for ops that write
nothing), so XLA updates them in place.

The item table's gradient is not formed inside the loop: the head returns per
microbatch what its table gradient needs (`saved`) and stage 0 the looked-up rows'
cotangents; the caller forms the table gradient once per step from those. A
table-sized add per tick would cost ticks x table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrec.parallel.pipeline.layout import StageLayout
from jaxrec.parallel.pipeline.schedules import (B_FIRST, B_REST, F_FIRST, F_LAST, F_MID, IDLE,
                                                OP_SCOPE, SEND_SCOPES, SPREAD_HEAD_SCOPE,
                                                Schedule)
from jaxrec.parallel.vma import make_varying, varying_axes


@dataclasses.dataclass(frozen=True)
class StagePieces:
  """The model as the pipeline sees it: pure functions over this device's shards.

  embed(shared, tokens_i, keys_i) -> x [mb, T, D]: stage 0's input (tokens_i: the
      microbatch's per-token arrays, "inputs" and e.g. "segments").
  embed_vjp(shared, tokens_i, keys_i, d_x) -> (d_small, d_rows): the embedding's
      gradient w.r.t. the small shared params and the looked-up item rows.
  stage(params, x, aux) -> y; aux = (tokens_i, layer_ids [Lmax], active [Lmax] or
      None, keys_i): one chunk of stacked layers. Wrapped by the caller in the
      `jax.checkpoint` policy that decides what its backward keeps.
  head(shared, y, i) -> (loss, d_y, d_small, saved) while training: the item head
      of microbatch i with its input's cotangent, the small params' gradient and
      what the table gradient needs later (a pytree of arrays);
      head(shared, y, i) -> per-row outputs in a forward-only schedule.
  small(shared) -> the params `d_small` are gradients of (everything but the table).
  """
  embed: Callable[..., jax.Array]
  embed_vjp: Callable[..., tuple[Any, jax.Array]]
  stage: Callable[..., jax.Array]
  head: Callable[..., Any]
  small: Callable[[Any], Any]


@dataclasses.dataclass
class PipelineResult:
  loss: jax.Array | None = None     # sum over this device's microbatches (last stage)
  stage_grads: Any = None           # this device's stacked-layer slots
  small_grads: Any = None           # the small shared params (summed over microbatches)
  d_rows: jax.Array | None = None   # [M, mb, T, D] looked-up rows' cotangents (stage 0)
  saved: Any = None                 # [M, ...] what each microbatch's head saved
  outputs: Any = None               # forward-only: [M, ...] head outputs


def run(schedule: Schedule, stages: StageLayout, pieces: StagePieces, stage_params: Any,
        shared: Any, microbatches: dict[str, jax.Array], keys: jax.Array | None,
        axis: str = "pipe", vary_axes: Sequence[str] = (),
        head_spread: bool = False) -> PipelineResult:
  """Executes `schedule` on this device (inside shard_map).

  microbatches: [M, mb, T] per-token arrays ("inputs", optionally "segments", ...)
  that drive the embedding and the stages; the head receives the microbatch index.
  keys: raw dropout key data [M, mb, 2] or None.
  vary_axes: mesh axes every buffer varies over besides `axis` (the data axes).
  head_spread: the item head of each microbatch runs on every stage (each scoring
  its share of the catalogue; `pieces.head` reduces over `axis`) instead of on the
  last stage alone: the finished microbatch is broadcast over `axis` on the tick it
  leaves the last stage. Loss and small-param gradients then count on the last
  stage only (every stage computes the same values).
  """
  training = not schedule.forward_only
  me = lax.axis_index(axis)
  p = schedule.pipe
  m = schedule.microbatches
  lmax = stages.slots_per_chunk
  vary = (axis, *vary_axes)
  layer_ids, active = (jnp.asarray(a)[me] for a in stages.device_tables())

  def tokens(i):
    return {k: v[i] for k, v in microbatches.items()}

  def key(i):
    return None if keys is None else keys[i]

  def chunk(tree, v):
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, v * lmax, lmax, 0), tree)

  def aux_for(i, v):
    return (tokens(i), layer_ids[v], active[v] if stages.padded else None, key(i))

  def zeros(shape_tree):
    return make_varying(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape_tree), vary)

  x_shape = jax.eval_shape(pieces.embed, shared, tokens(0), key(0))
  x_zero = zeros(x_shape)
  ct_zero = x_zero.astype(jnp.float32)
  small = pieces.small(shared)
  vjp_probe = _probe_stage_vjp(pieces.stage, chunk(stage_params, 0), x_zero, aux_for(0, 0)) \
      if training else None
  spare = max(schedule.num_slots, 1)   # one extra slot takes the writes of idle ops

  def buffer(zero, n):
    return jnp.broadcast_to(zero, (n + 1, *zero.shape))

  carry = {"act": buffer(x_zero, spare)}
  if training:
    head_shapes = jax.eval_shape(pieces.head, shared, x_zero, 0)
    carry.update(
        ct=buffer(ct_zero, spare),
        res=[buffer(z, spare) for z in vjp_probe.opaque_zeros(vary)],
        g_stage=make_varying(_zeros_f32(stage_params), vary),
        g_small=make_varying(_zeros_f32(small), vary),
        loss=make_varying(jnp.zeros((), jnp.float32), vary),
        d_rows=buffer(ct_zero, m),
        saved=jax.tree.map(lambda z: buffer(z, m), zeros(head_shapes[3])))
  else:
    out_shape = jax.eval_shape(pieces.head, shared, x_zero, 0)
    carry["out"] = jax.tree.map(lambda z: buffer(z, m), zeros(out_shape))

  codes = schedule.codes()
  position = np.zeros(6, np.int32)
  position[codes] = np.arange(len(codes))

  def template():
    """What a branch returns; every branch returns all of it (zeros where unused)."""
    t = {"send_f": x_zero, "x": x_zero}
    if training:
      t.update(send_b=x_zero, res=vjp_probe.opaque_zeros(vary),
               d_chunk=jax.tree.map(jnp.zeros_like, chunk(carry["g_stage"], 0)),
               d_small=carry["g_small"], d_rows=ct_zero)
      if not head_spread:
        t.update(loss=carry["loss"], ct=ct_zero,
                 saved=jax.tree.map(lambda b: b[0], carry["saved"]))
    elif not head_spread:
      t["out"] = jax.tree.map(lambda b: b[0], carry["out"])
    return t

  def branch(code, reads, row):
    result = dict(template())
    i, v = row["mb"], row["chunk"]
    if code == IDLE:
      return _match(result, template())
    params = chunk(stage_params, v)
    aux = aux_for(i, v)
    if code in (F_FIRST, F_MID, F_LAST):
      x = pieces.embed(shared, tokens(i), key(i)) if code == F_FIRST else reads["x"]
      result["x"] = x
      if training:
        y, vjp_fn = jax.vjp(pieces.stage, params, x, aux)
        result["res"] = vjp_probe.opaque(vjp_fn)
      else:
        y = pieces.stage(params, x, aux)
      if code != F_LAST:
        result["send_f"] = y
      elif head_spread:
        result["send_f"] = y    # not sent: the spread head broadcasts it below
      elif training:
        loss, d_y, d_small, saved = pieces.head(shared, y, i)
        result.update(loss=loss, ct=d_y, d_small=d_small, saved=saved)
      else:
        result["out"] = pieces.head(shared, y, i)
      return _match(result, template())
    vjp_fn = vjp_probe.rebuild(params, reads["x"], aux, reads["res"])
    d_params, d_x, _ = vjp_fn(reads["ct"].astype(x_zero.dtype))
    result["d_chunk"] = d_params
    if code == B_FIRST:
      result["d_small"], result["d_rows"] = pieces.embed_vjp(shared, tokens(i), key(i), d_x)
    else:
      result["send_b"] = d_x
    return _match(result, template())

  table = {k: jnp.asarray(v) for k, v in schedule.table().items()}
  pattern_f, senders_f = schedule.send_patterns("forward")
  xs = {"row": table, "pattern_f": jnp.asarray(pattern_f)}
  if training:
    pattern_b, senders_b = schedule.send_patterns("backward")
    xs["pattern_b"] = jnp.asarray(pattern_b)
  if head_spread:
    xs["last"] = jnp.asarray(schedule.last_ticks())

  def tick(carry, xs):
    carry = dict(carry)
    row = {k: v[me] for k, v in xs["row"].items()}
    op, slot, i = row["op"], row["slot"], row["mb"]
    is_f = (op == F_FIRST) | (op == F_MID) | (op == F_LAST)
    is_b = (op == B_FIRST) | (op == B_REST)
    reads = {"x": carry["act"][slot]}
    if training:
      reads["ct"] = carry["ct"][slot]
      reads["res"] = [r[slot] for r in carry["res"]]
    with jax.named_scope(OP_SCOPE):
      got = lax.switch(jnp.asarray(position)[op],
                       [functools.partial(branch, c) for c in codes], reads, row)
    # the writes, after the switch (in place)
    carry["act"] = _write(carry["act"], got["x"], jnp.where(op == F_FIRST, slot, spare))
    if training:
      carry["res"] = [_write(b, r, jnp.where(is_f, slot, spare))
                      for b, r in zip(carry["res"], got["res"])]
      start = jnp.where(is_b, row["chunk"], 0) * lmax
      carry["g_stage"] = jax.tree.map(
          lambda g, d: lax.dynamic_update_slice_in_dim(
              g, lax.dynamic_slice_in_dim(g, start, lmax, 0) + d, start, 0),
          carry["g_stage"], got["d_chunk"])
      carry["g_small"] = jax.tree.map(jnp.add, carry["g_small"], got["d_small"])
      carry["d_rows"] = _write(carry["d_rows"], got["d_rows"], jnp.where(op == B_FIRST, i, m))
      if not head_spread:
        done = op == F_LAST
        carry["loss"] = carry["loss"] + got["loss"]
        carry["ct"] = _write(carry["ct"], got["ct"], jnp.where(done, slot, spare))
        carry["saved"] = jax.tree.map(lambda b, s: _write(b, s, jnp.where(done, i, m)),
                                      carry["saved"], got["saved"])
    elif not head_spread:
      carry["out"] = jax.tree.map(
          lambda b, o: _write(b, o, jnp.where(op == F_LAST, i, m)), carry["out"], got["out"])
    if head_spread:
      carry = spread_head(carry, xs["last"], row, got["send_f"])
    received = _send(got["send_f"], xs["pattern_f"], senders_f, axis, p, +1,
                     SEND_SCOPES["forward"])
    carry["act"] = _write(carry["act"], received.astype(x_zero.dtype),
                          jnp.where(row["recv_f"] >= 0, row["recv_f"], spare))
    if training:
      received = _send(got["send_b"], xs["pattern_b"], senders_b, axis, p, -1,
                       SEND_SCOPES["backward"])
      carry["ct"] = _write(carry["ct"], received.astype(jnp.float32),
                           jnp.where(row["recv_b"] >= 0, row["recv_b"], spare))
    return carry, None

  def spread_head(carry, any_last, row, y):
    """Every stage scores its share of the catalogue for the microbatch that just left
    the last stage. The conditional (taken on the same ticks on every device) returns
    only small values; the buffers are written after it, in place."""
    done = row["op"] == F_LAST

    def run_head(y):
      y_all = lax.psum(jnp.where(done, y, 0).astype(jnp.float32), axis).astype(x_zero.dtype)
      # Typed varying again: each stage differentiates its own copy, so no backward
      # psum sums the (identical) input gradients over the stages.
      y_all = make_varying(y_all, (axis,))
      i_all = lax.psum(jnp.where(done, row["mb"], 0), axis)
      return make_varying((pieces.head(shared, y_all, i_all), i_all), vary)

    def skip(y):
      del y
      return make_varying((jax.tree.map(jnp.zeros_like, head_zero), jnp.int32(m)), vary)

    head_zero = jax.eval_shape(lambda y: run_head(y)[0], y)
    head_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), head_zero)
    with jax.named_scope(SPREAD_HEAD_SCOPE):
      result, index = lax.cond(any_last, run_head, skip, y)
    carry = dict(carry)
    if not training:
      carry["out"] = jax.tree.map(lambda b, o: _write(b, o, index), carry["out"], result)
      return carry
    loss, d_y, d_small, saved = result
    last = me == p - 1      # every stage computed the same loss and small gradients
    carry["loss"] = carry["loss"] + jnp.where(last, loss, 0.0)
    carry["g_small"] = jax.tree.map(lambda g, d: g + jnp.where(last, d, 0).astype(g.dtype),
                                    carry["g_small"], d_small)
    carry["ct"] = _write(carry["ct"], d_y, jnp.where(done, row["slot"], spare))
    carry["saved"] = jax.tree.map(lambda b, s: _write(b, s, index), carry["saved"], saved)
    return carry

  carry, _ = lax.scan(tick, carry, xs)
  if not training:
    return PipelineResult(outputs=jax.tree.map(lambda b: b[:m], carry["out"]))
  return PipelineResult(loss=carry["loss"], stage_grads=carry["g_stage"],
                        small_grads=carry["g_small"], d_rows=carry["d_rows"][:m],
                        saved=jax.tree.map(lambda b: b[:m], carry["saved"]))


# ---------------------------------------------------------------------------
class _StageVJP:
  """The structure of one stage's VJP, read from an abstract trace.

  `jax.vjp` returns a VJP object whose pytree children are (the primal inputs it
  reuses, with the unused ones marked NotNeeded; the opaque residuals it computed).
  The opaque residuals are what a forward tick stores per slot; the reused primals
  (params, the stage input, token ids) are handed back at the backward tick.
  """

  def __init__(self, treedef, used: list[bool], n_primal_leaves: int, opaque_shapes,
               opaque_vary):
    self.treedef, self.used, self.n_primal = treedef, used, n_primal_leaves
    self.opaque_shapes, self.opaque_vary = opaque_shapes, opaque_vary

  def opaque(self, vjp_fn) -> list[jax.Array]:
    opaque = jax.tree.leaves(vjp_fn)[self.n_primal:]
    if [(r.shape, r.dtype) for r in opaque] != [(s.shape, s.dtype) for s in self.opaque_shapes]:
      raise AssertionError("a stage's VJP residuals differ from its abstract probe's")
    return opaque

  def opaque_zeros(self, vary) -> list[jax.Array]:
    return [make_varying(jnp.zeros(s.shape, s.dtype), set(vary) | v)
            for s, v in zip(self.opaque_shapes, self.opaque_vary)]

  def rebuild(self, params, x, aux, opaque: list[jax.Array]):
    primals = jax.tree.leaves((params, x, aux))
    reused = [leaf for leaf, used in zip(primals, self.used) if used]
    return jax.tree.unflatten(self.treedef, reused + list(opaque))


def _probe_stage_vjp(stage, params, x, aux) -> _StageVJP:
  found = {}

  def probe(params, x, aux):
    _, vjp_fn = jax.vjp(stage, params, x, aux)
    if not hasattr(vjp_fn, "args_res") or not hasattr(vjp_fn, "opaque_residuals"):
      raise RuntimeError(
          "jax.vjp no longer returns a VJP with args_res / opaque_residuals; the pipeline "
          "executor needs the JAX version pinned in requirements.txt")
    is_marker = lambda a: type(a).__name__ == "NotNeeded"  # noqa: E731
    marked = jax.tree.leaves(vjp_fn.args_res, is_leaf=is_marker)
    found["used"] = [not is_marker(a) for a in marked]
    found["n_primal"] = sum(found["used"])
    leaves, found["treedef"] = jax.tree.flatten(vjp_fn)
    opaque = leaves[found["n_primal"]:]
    found["vary"] = [varying_axes(r) for r in opaque]
    return opaque

  shapes = jax.eval_shape(probe, params, x, aux)
  if len(found["used"]) != len(jax.tree.leaves((params, x, aux))):
    raise AssertionError("the VJP's reused-primal markers do not line up with the primals")
  return _StageVJP(found["treedef"], found["used"], found["n_primal"], shapes, found["vary"])


def _send(value, pattern, patterns: list[tuple[int, ...]], axis: str, p: int, step: int,
          scope: str):
  """ppermute of `value` from this tick's senders to their neighbours (`step` = +1
  forward, -1 backward); pattern 0 sends nothing."""
  def permute(senders, x):
    if not senders:
      return jnp.zeros_like(x)
    return lax.ppermute(x, axis, [(d, (d + step) % p) for d in senders])

  if len(patterns) == 1:
    return jnp.zeros_like(value)
  with jax.named_scope(scope):
    return lax.switch(pattern, [functools.partial(permute, s) for s in patterns], value)


def _zeros_f32(tree: Any) -> Any:
  """fp32 accumulators for the gradients of `tree` (whatever its dtype)."""
  return jax.tree.map(lambda x: jnp.zeros_like(x, dtype=jnp.float32), tree)


def _write(buffer: jax.Array, value: jax.Array, index) -> jax.Array:
  return lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), index, 0)


def _match(values: dict, template: dict) -> dict:
  """Casts each value to its template's dtype and varying axes (the branches of a
  switch must return exactly the same types)."""
  def cast(v, t):
    v = jnp.asarray(v).astype(t.dtype)
    return make_varying(v, varying_axes(t))
  return jax.tree.map(cast, values, template)
