"""MovieLens-1M, HSTU-large: configs/ml-1m/hstu-sampled-softmax-n128-large-final.gin —
8 blocks, 2 heads of 25 (q/k and u/v), d=50; otherwise `ml1m_hstu.py`."""

from experiments.configs import ml1m_hstu


def get_config():
  c = ml1m_hstu.hstu_block(ml1m_hstu.get_config(), layers=8, heads=2, head_dim=25)
  c.name = "ml1m_hstu_large"
  return c
