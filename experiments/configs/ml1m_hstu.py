"""MovieLens-1M, HSTU: the published recipe (generative-recommenders,
configs/ml-1m/hstu-sampled-softmax-n128-final.gin).

2 HSTU blocks, 1 head, d=50 (q/k and u/v 50 per head), input and linear dropout
0.2, relative position bias (+ time buckets where the data has timestamps; the
SASRec-format ml-1m.txt has none), no final LayerNorm, 200 positions, batch 128,
AdamW lr 1e-3 without decay or schedule, ~100 epochs; sampled softmax with 128
uniform negatives per position, L2-normalised embeddings, temperature 0.05. The
checkpoint reported is the one with the best validation NDCG@10 (every 5 epochs).
Embeddings start as the reference's do (`ml1m_sampled.reference_init`, then
`reference_hstu_init` for the positions).
"""

import math

from experiments.configs import ml1m, ml1m_sampled

REFERENCE_OUTPUT_LEN = 11   # generative-recommenders' gr_output_length (10) + 1


def reference_hstu_init(c):
  """generative-recommenders' HSTU position init (in place; returns it). Its
  `HSTU.reset_params` re-initialises every parameter outside the blocks and the item
  table with xavier normal, and that includes the input preprocessor's learned
  positions: a [max_len + 11, d] table, so std sqrt(2 / (max_len + 11 + d)) — 0.088
  on ML-1M, where SASRec (whose `reset_state` skips the preprocessor) keeps the
  preprocessor's sqrt(1/d) = 0.141 (`ml1m_sampled.reference_init`)."""
  c.model.position_init_std = math.sqrt(
      2.0 / (c.data.max_len + REFERENCE_OUTPUT_LEN + c.model.d_model))
  return c


def hstu_block(c, layers: int, heads: int, head_dim: int):
  """The HSTU block as the published configs set it (in place; returns it)."""
  c.model.block = "hstu"
  c.model.n_layers = layers
  c.model.n_heads = heads
  c.model.hstu_qk_dim = head_dim
  c.model.hstu_v_dim = head_dim
  c.model.final_norm = False
  c.model.time_bias = True
  return c


def get_config():
  c = ml1m_sampled.reference_init(ml1m_sampled.hstu_loss(ml1m.recipe()))
  c = reference_hstu_init(hstu_block(c, layers=2, heads=1, head_dim=50))
  c.name = "ml1m_hstu"
  return c
