"""MovieLens-1M, HSTU: the published recipe (generative-recommenders,
configs/ml-1m/hstu-sampled-softmax-n128-final.gin).

2 HSTU blocks, 1 head, d=50 (q/k and u/v 50 per head), input and linear dropout
0.2, relative position bias (+ time buckets where the data has timestamps; the
SASRec-format ml-1m.txt has none), no final LayerNorm, 200 positions, batch 128,
AdamW lr 1e-3 without decay or schedule, ~100 epochs; sampled softmax with 128
uniform negatives per position, L2-normalised embeddings, temperature 0.05. The
checkpoint reported is the one with the best validation NDCG@10 (every 5 epochs).
Embeddings start as the reference's do (`reference_init`); the SASRec rows
(`ml1m.py`, `ml1m_sampled.py`) were measured with jaxrec's own init and keep it.
"""

from experiments.configs import ml1m_sampled


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


def reference_init(c):
  """generative-recommenders' embedding init (in place; returns it): item rows std
  0.02 (embedding_modules.py), learned positions std sqrt(1/d)
  (input_features_preprocessors.py), so after the sqrt(d) input scale both start at
  std sqrt(1/d). The reference draws them truncated at 2 std; these are untruncated."""
  c.model.item_init_std = 0.02
  c.model.position_init_std = c.model.d_model ** -0.5
  return c


def get_config():
  c = hstu_block(reference_init(ml1m_sampled.get_config()), layers=2, heads=1, head_dim=50)
  c.name = "ml1m_hstu"
  return c
