"""Quickstart: SASRec-CE on the embedded MovieLens ml-latest-small (610 users).

A few minutes on a 2-core CPU. Long histories are cut into windows (stride 50)
so the 610 users give ~2.2k training sequences.
"""

from jaxrec.config import default_config


def get_config():
  c = default_config()
  c.name = "quickstart"
  c.mesh = "data:-1"
  c.data.max_len = 50
  c.data.window_stride = 50
  c.model.d_model = 64
  c.model.n_heads = 2
  c.model.n_layers = 2
  c.model.d_ff = 256
  c.model.dropout = 0.2
  c.train.steps = 600
  c.train.batch_size = 64
  c.train.lr = 2e-3
  c.train.warmup_steps = 50
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.eval.batch_size = 128
  return c
