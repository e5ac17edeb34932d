"""Amazon Video Games (SASRec's `Video.txt`), HSTU: `amazon.py`'s data and schedule with
the block and loss of generative-recommenders' published Amazon recipe
(configs/amzn-books/hstu-sampled-softmax-n512-final.gin, the Books category: no HSTU
configuration for this file is published): 4 HSTU blocks, 4 heads of 16 (q/k and
u/v), d=64, dropout 0.5, length 50; sampled softmax with 512 uniform negatives per
position, L2-normalised embeddings, temperature 0.05; the reference's embedding init
(`ml1m_sampled.reference_init`, without which the normalised sampled loss learns
several times more slowly; then HSTU's position init, `ml1m_hstu.reference_hstu_init`).
The SASRec-format file has no timestamps, so the time bias is off (the loop logs it).
"""

from experiments.configs import amazon, ml1m_hstu, ml1m_sampled


def get_config():
  c = ml1m_sampled.reference_init(ml1m_sampled.hstu_loss(amazon.get_config()))
  c.loss.num_negatives = 512
  c = ml1m_hstu.reference_hstu_init(ml1m_hstu.hstu_block(c, layers=4, heads=4, head_dim=16))
  c.name = "amazon_hstu"
  return c
