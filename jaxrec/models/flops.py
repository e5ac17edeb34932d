"""FLOPs of the model's pieces per token: what the balancer's analytic costs and the
cost model's formulas are built from (checked against the compiled HLO in the tests).
"""

from __future__ import annotations

from jaxrec.models.losses import LossConfig


def layer_flops_per_token(cfg) -> float:
  """Forward FLOPs of one block per token (matmuls; the attention dense over the row).

  SASRec: QKV + output projections, the MLP, the score and value matmuls.
  HSTU: the fused u/v/q/k projection, the score and value matmuls, the output
  projection; no MLP."""
  d, t = cfg.d_model, cfg.max_len
  if getattr(cfg, "block", "sasrec") == "hstu":
    h, qk, v = cfg.n_heads, cfg.qk_dim, cfg.v_dim
    return 2.0 * (d * h * (2 * v + 2 * qk) + h * v * d) + 2.0 * t * h * (qk + v)
  mlp_mults = 3 if cfg.mlp == "swiglu" else 2
  return 2.0 * (4 * d * d + mlp_mults * d * cfg.d_ff) + 4.0 * t * d


def candidates(loss: LossConfig, in_batch_tokens: int) -> int:
  """Items each token is scored against by the sampled softmax: the uniform
  negatives and/or the (gathered) batch's target slots, plus the positive."""
  count = 1
  if loss.negatives in ("uniform", "mixed"):
    count += loss.num_negatives
  if loss.negatives in ("in_batch", "mixed"):
    count += in_batch_tokens
  return count


def head_flops_per_token(d_model: int, table_rows: int, loss: LossConfig | None = None,
                         in_batch_tokens: int = 0) -> float:
  """Forward FLOPs of the item head's logits per token: the whole table for the full
  softmax, the candidates for the sampled one."""
  if loss is None or loss.type == "full":
    return 2.0 * d_model * table_rows
  return 2.0 * d_model * candidates(loss, in_batch_tokens)


def model_flops(cfg, tokens: int, loss: LossConfig | None = None, in_batch_tokens: int = 0
                ) -> float:
  """Useful FLOPs of one train step (forward + backward = 3x forward) over all devices."""
  per_token = (cfg.n_layers * layer_flops_per_token(cfg)
               + head_flops_per_token(cfg.d_model, cfg.table_rows, loss, in_batch_tokens))
  return 3.0 * per_token * tokens


def head_recompute_flops(cfg, tokens: int, loss: LossConfig | None = None,
                         in_batch_tokens: int = 0) -> float:
  """FLOPs the head spends beyond the useful 3x: the tiled softmax recomputes each
  tile's logits for the table's gradient; the sampled one recomputes its
  checkpointed chunks. One more forward of the logits either way."""
  return tokens * head_flops_per_token(cfg.d_model, cfg.table_rows, loss, in_batch_tokens)
