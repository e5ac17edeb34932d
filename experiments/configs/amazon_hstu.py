"""Amazon Video (SASRec format), HSTU: `amazon.py`'s data and schedule with the
HSTU block and HSTU's loss (sampled softmax, 128 uniform negatives per position,
L2-normalised embeddings, temperature 0.05) — the ML-1M recipe's choices carried
over, as no HSTU configuration for this dataset is published. The SASRec-format
file has no timestamps, so the time bias is off (the loop logs it).
"""

from experiments.configs import amazon, ml1m_hstu, ml1m_sampled


def get_config():
  c = ml1m_sampled.hstu_loss(amazon.get_config())
  c = ml1m_hstu.hstu_block(c, layers=2, heads=1, head_dim=64)
  c.name = "amazon_hstu"
  return c
