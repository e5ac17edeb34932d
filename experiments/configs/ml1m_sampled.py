"""MovieLens-1M, SASRec with HSTU's sampled softmax: the published SASRec row's recipe.

`ml1m.py` with the loss of configs/ml-1m/sasrec-sampled-softmax-n128-final.gin: 128
negatives drawn uniformly per step, L2-normalised query and item embeddings, logits
/ 0.05 (temperature), the target masked among the negatives. Items are ranked by
cosine similarity at evaluation, as the model was trained.
"""

from experiments.configs import ml1m


def hstu_loss(c):
  """HSTU's sampled softmax on a config (in place; returns it)."""
  c.loss.type = "sampled"
  c.loss.negatives = "uniform"
  c.loss.num_negatives = 128
  c.loss.l2_norm = True
  c.loss.temperature = 0.05
  c.loss.logq_correction = False   # uniform negatives: a constant shift, no effect
  return c


def get_config():
  c = hstu_loss(ml1m.get_config())
  c.name = "ml1m_sampled"
  return c
