"""Amazon Video (SASRec format), HSTU: `amazon.py`'s data and schedule with the
HSTU block and HSTU's loss (sampled softmax, 128 uniform negatives per position,
L2-normalised embeddings, temperature 0.05) — the ML-1M recipe's choices carried
over, as no HSTU configuration for this dataset is published. The SASRec-format
file has no timestamps, so the time bias is off (the loop logs it).
"""

from experiments.configs import amazon


def get_config():
  c = amazon.get_config()
  c.name = "amazon_hstu"
  c.model.block = "hstu"
  c.model.n_layers = 2
  c.model.n_heads = 1
  c.model.d_model = 64
  c.model.hstu_qk_dim = 64
  c.model.hstu_v_dim = 64
  c.model.final_norm = False
  c.model.time_bias = True
  c.loss.type = "sampled"
  c.loss.negatives = "uniform"
  c.loss.num_negatives = 128
  c.loss.l2_norm = True
  c.loss.temperature = 0.05
  c.loss.logq_correction = False
  c.train.select_on = "ndcg@10"
  return c
