"""Textbook communication volumes per mesh axis for one train step.

These are the formulas the measured HLO bytes are compared with (and that the
cost model uses where a step is too large to compile): payload bytes per device
per step, keyed like `hlo.bytes_by_axis` (the mesh axes a collective spans).

- tensor (Megatron + vocab-parallel table): per transformer layer one all-reduce
  of the [B, T, D] activations after attention and one after the MLP, and their two
  transposes in the backward pass (HSTU: the output projection's and its input
  gradient's, plus the two [B, T] statistics of its multi-head LayerNorm); the embedding lookup's all-reduce forward and
  the tied head's input-gradient all-reduce backward; three [B*T] fp32 statistics
  for the vocab-parallel softmax (max, sum of exponentials, target logit).
- data: one all-reduce of every gradient shard (fp32), or what the compressor
  sends instead (GradientSync.analytic_bytes).
- pipe: each microbatch's activation crosses every virtual-stage boundary forward
  and its gradient backward (2 x microbatches x microbatch activations per
  boundary); the item table and other stage-shared params have their gradients
  all-reduced over the stages.
All volumes are per average device: with a pipeline, the embedding lives on the
first stage and the loss on the last, so their traffic is shared over P devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrec.mesh import MeshShape
from jaxrec.models import flops
from jaxrec.models.losses import LossConfig
from jaxrec.partitioning import spec_mesh_axes

FP32 = 4


@dataclasses.dataclass(frozen=True)
class StepShape:
  """What the communication volume of a step depends on."""
  mesh: MeshShape
  global_batch: int
  seq_len: int
  d_model: int
  n_layers: int
  act_bytes: int = FP32
  virtual_stages: int = 1
  head_spread: bool = False   # pipeline head scored by every stage (see parallel/pipeline)
  block: str = "sasrec"       # hstu: 2 activation all-reduces per layer + 2 [B, T] statistics
  table_data: int = 1         # data-axis devices the item table's rows are split over

  @property
  def local_batch(self) -> int:
    return self.global_batch // self.mesh.data_size

  @property
  def activation_bytes(self) -> float:
    return float(self.local_batch * self.seq_len * self.d_model * self.act_bytes)


def shard_bytes(shapes: Any, specs: Any, mesh: MeshShape, bytes_per: int = FP32) -> float:
  """Bytes of one device's shard of every leaf (params or gradients)."""
  sizes = mesh.as_dict()
  total = 0.0
  leaves = jax.tree.leaves(shapes)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for leaf, spec in zip(leaves, spec_leaves):
    split = math.prod(sizes[a] for a in spec_mesh_axes(spec))
    total += np.prod(leaf.shape) * bytes_per / split
  return float(total)


def tensor_bytes(s: StepShape) -> float:
  if s.mesh.tensor <= 1:
    return 0.0
  p = s.mesh.pipe
  act = s.activation_bytes
  tokens = s.local_batch * s.seq_len
  if s.block == "hstu":   # output projection, input gradient, the norm's mean and variance
    # forward and backward, and the gradient of the relative bias [B, T, T] (fp32,
    # replicated over the head shards): measured per layer on the tiny model
    bias = s.local_batch * s.seq_len ** 2 * FP32
    layers = s.n_layers / p * (2 * act + 4 * tokens * FP32 + bias)
  else:                   # Megatron: attention and MLP, forward and backward
    layers = 4 * s.n_layers / p * act
  if (s.head_spread and p > 1) or s.table_data > 1:
    # only the lookup's rows are summed over tensor here: the spread head reduces over
    # pipe x tensor (spread_head_bytes), the rows table's head over data x tensor
    # (rows_head_bytes)
    return layers + act / p
  stats = 3 * tokens * FP32
  grad = tokens * s.d_model * FP32   # the head's hidden-state gradient is fp32
  return layers + (act + grad + stats) / p


def pipe_bytes(s: StepShape, shared_grad_bytes: float) -> tuple[float, float]:
  """(buffer, wire) bytes over `pipe`: activation/cotangent sends + shared grads, and
  for the spread head the broadcast of each finished microbatch (its statistics and
  hidden-state gradient are reduced over pipe x tensor: spread_head_bytes)."""
  p = s.mesh.pipe
  if p <= 1:
    return 0.0, 0.0
  boundaries = p * s.virtual_stages - 1
  sends = 2 * boundaries / p * s.activation_bytes
  reduce = shared_grad_bytes + (s.activation_bytes if s.head_spread else 0.0)
  return sends + reduce, sends + 2 * (p - 1) / p * reduce


def spread_head_bytes(s: StepShape) -> tuple[str, float, float] | None:
  """The spread head's softmax statistics (max, sum of exponentials, target logit per
  token) and its fp32 hidden-state gradient [tokens, D], each all-reduced over
  tensor x pipe together (one collective, measured)."""
  if not (s.head_spread and s.mesh.pipe > 1):
    return None
  n = s.mesh.tensor * s.mesh.pipe
  payload = (3 + s.d_model) * s.local_batch * s.seq_len * FP32
  key = "pipe,tensor" if s.mesh.tensor > 1 else "pipe"
  return key, payload, 2 * (n - 1) / n * payload


def rows_head_bytes(s: StepShape, item_key: str, data_key: str
                    ) -> tuple[tuple[str, float, float], ...]:
  """The full-softmax head over a rows-sharded table: every device scores the whole
  data group's tokens against its rows, so the tokens' hidden states and targets are
  all-gathered over data (and the loss's per-token cotangent with them), the per-token
  statistics (max, sum of exponentials, target logit) are all-reduced over the
  table's axes (data x tensor), and the hidden-state gradient [tokens, D] (the
  softmax-weighted sum of item rows) is summed over tensor and reduce-scattered over
  data to the tokens' owners."""
  if s.table_data <= 1:
    return ()
  dg, t = s.table_data, s.mesh.tensor
  g = dg * t
  tokens = s.local_batch * s.seq_len * dg / s.mesh.pipe   # the head runs on one stage
  rows = tokens * s.d_model * FP32   # the hidden states' gradient is fp32
  gathered = tokens * (s.d_model * s.act_bytes + 2 * FP32)   # h, targets, cotangent
  data_share = (dg - 1) / dg
  stats = tokens * 3 * FP32
  out = [(data_key, gathered + rows, data_share * (gathered + rows)),
         (item_key, stats, 2 * (g - 1) / g * stats)]
  if t > 1:
    out.append(("tensor", rows, 2 * (t - 1) / t * rows))
  return tuple(out)


def table_exchange_bytes(mesh: MeshShape, ids_per_step: float, d_model: int,
                         act_bytes: int, data_axes: tuple[str, ...],
                         grad_row_bytes: float | None = None) -> tuple[str, float, float]:
  """(axis key, payload, wire) bytes per device per step of the rows-sharded table's
  lookups: the de-duplicated ids all-gathered over data, the rows reduce-scattered
  back, and in the backward pass the rows' gradients all-gathered to their owners
  (buffers sized by the ids a device looks up — its unique ids at most).
  `grad_row_bytes`: one row's gradient on the wire (compressed; default as computed)."""
  group = math.prod(getattr(mesh, a) for a in data_axes)
  if group <= 1:
    return ",".join(data_axes), 0.0, 0.0
  share = (group - 1) / group
  ids = group * ids_per_step * 4
  rows = group * ids_per_step * d_model * act_bytes
  grads = group * ids_per_step * (d_model * act_bytes if grad_row_bytes is None
                                  else grad_row_bytes)
  payload = ids + rows + grads
  return ",".join(data_axes), payload, share * payload


def analytic_bytes_by_axis(s: StepShape, data_bytes: dict[str, tuple[float, float]],
                           data_frequency: float = 1.0, shared_grad_bytes: float = 0.0,
                           extra: tuple[tuple[str, float, float], ...] = ()
                           ) -> tuple[dict[str, float], dict[str, float]]:
  """(buffer bytes, ring-wire bytes) per step by axis key.

  `data_bytes` is the gradient synchronisation's own (buffer, wire) estimate per
  reduction (GradientSync.analytic_bytes); `data_frequency` how many reductions
  run per step (1/H for local SGD / DiLoCo); `shared_grad_bytes` the per-device
  bytes of params every pipeline stage holds.
  """
  payload: dict[str, float] = {}
  wire: dict[str, float] = {}
  if s.mesh.tensor > 1:
    t = s.mesh.tensor
    payload["tensor"] = tensor_bytes(s)
    wire["tensor"] = 2 * (t - 1) / t * payload["tensor"]
  if s.mesh.pipe > 1:
    payload["pipe"], wire["pipe"] = pipe_bytes(s, shared_grad_bytes)
  spread = spread_head_bytes(s)
  if spread:
    key, p_bytes, w_bytes = spread
    payload[key] = payload.get(key, 0.0) + p_bytes
    wire[key] = wire.get(key, 0.0) + w_bytes
  for key, (p, w) in data_bytes.items():
    payload[key] = payload.get(key, 0.0) + p * data_frequency
    wire[key] = wire.get(key, 0.0) + w * data_frequency
  for key, p, w in extra:   # e.g. the rows-sharded table's exchange (every step)
    if p:
      payload[key] = payload.get(key, 0.0) + p
      wire[key] = wire.get(key, 0.0) + w
  return payload, wire


# ---------------------------------------------------------------------------
# FLOPs and memory: what the cost model and the planner need where a step is too
# large to compile. Checked against the compiled HLO in tests/test_cost_model.py.
# ---------------------------------------------------------------------------
def layer_activation_bytes_per_token(cfg, tensor: int, act_bytes: int = FP32,
                                     remat: str = "none") -> tuple[float, float]:
  """(kept per layer, transient) bytes per token on one device for the backward pass.

  Without remat a layer keeps its residual stream, norms and their inputs (~6 x d,
  replicated over tensor), Q/K/V and the attention output (4 x d / t), the MLP's pre-
  and post-activation (2 x d_ff / t), the attention scores and probabilities
  (2 x heads / t x T). Under a `model.remat` policy each layer keeps less and one
  layer's full set is rebuilt at a time in the backward (the transient term):
  full keeps the layer input (d); dots_saveable the matmul outputs (Q/K/V, scores,
  attention and MLP outputs); save_attention_out the input and the attention output.
  """
  t, d = tensor, cfg.d_model
  full = act_bytes * (6 * d + (4 * d + 2 * cfg.d_ff) / t + 2 * cfg.n_heads / t * cfg.max_len)
  kept = {
      "none": full,
      "full": act_bytes * d,
      "dots_saveable": act_bytes * (2 * d + (4 * d + cfg.d_ff + cfg.n_heads * cfg.max_len) / t),
      "save_attention_out": act_bytes * 2 * d,
  }[remat]
  return kept, (0.0 if remat == "none" else full)


def state_bytes(params: float, param_bytes: int, opt_bytes: int, master: bool,
                extra_fp32_copies: float) -> float:
  """Bytes of the training state per device for `params` local parameters: the params
  and their gradient in the param dtype, Adam's two moments in the optimizer-state
  dtype, an fp32 master copy with bf16 params (`train.master_weights`), and the
  compressor's / data-parallel mode's fp32 copies."""
  return params * (2 * param_bytes + 2 * opt_bytes + (FP32 if master else 0)
                   + FP32 * extra_fp32_copies)


def head_bytes(cfg, loss: LossConfig, local_rows: int, tokens: float,
               in_batch_tokens: int) -> float:
  """Peak bytes the item head holds on one device while scoring `tokens` targets.

  Both losses walk the real targets in chunks of `loss.token_chunk`, so beyond the
  compacted hidden states, their gradient and three fp32 statistics per token, only
  one chunk's block is alive: its logits, exponentials and gradient (3 fp32 passes)
  over one tile of the local rows (full softmax) or over the candidates (sampled,
  plus the gathered rows of per-token negatives and their gradient).
  """
  chunk = max(1.0, min(float(loss.token_chunk), tokens))
  per_token = tokens * (2 * FP32 * cfg.d_model + 3 * FP32)
  if loss.type == "full":
    return per_token + 3 * FP32 * chunk * loss.tile(max(1, int(local_rows)))
  block = 3 * FP32 * chunk * flops.candidates(loss, in_batch_tokens)
  if loss.negatives in ("uniform", "mixed") and not loss.shared_negatives:
    block += 2 * FP32 * chunk * loss.num_negatives * cfg.d_model
  return per_token + block


def extra_state_copies(compressed: bool, dp_mode: str) -> float:
  """fp32 copies of the params beyond the optimizer's: the compressor's error feedback
  and the data-parallel mode's own (delayed gradient, local-SGD anchor, DiLoCo's outer
  momentum)."""
  extra = {"sync": 0, "delayed": 1, "local_sgd": 1, "diloco": 2}.get(dp_mode, 0)
  return (1 if compressed else 0) + extra


def elementwise_bytes(cfg, local_tokens: float, tensor: int, pipe: int,
                      act_bytes: int = FP32) -> float:
  """Memory traffic per device per step of the work that is not matmuls (norms,
  residual adds, GELU, the attention softmax, the item softmax): bandwidth-bound,
  so the cost model charges it to HBM rather than to the FLOP peak.

  Per layer and token (forward): two layer norms and two residual adds (~10 d reads
  and writes), GELU/SwiGLU on the hidden (~4 d_ff / t), softmax over the scores
  (~6 heads / t x T); the backward pass moves about twice that. The head writes,
  re-reads for the max and the exponentials, and forms the gradient of every local
  logit (~5 fp32 passes). XLA's own `bytes accessed` is not used: it counts loop
  bodies once and charges a gather for its whole operand.
  """
  t = tensor
  per_layer = act_bytes * (10 * cfg.d_model + 4 * cfg.d_ff / t + 6 * cfg.n_heads / t * cfg.max_len)
  head = FP32 * 5 * cfg.table_rows / t
  return local_tokens / pipe * (3 * cfg.n_layers * per_layer + head)
