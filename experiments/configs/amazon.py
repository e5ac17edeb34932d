"""Amazon reviews in the SASRec text format (`user item` per line, chronological).

  python -m experiments.train --config=experiments/configs/amazon.py \
      --config.data.path=/path/to/Video.txt --workdir=runs/amazon-video
"""

from jaxrec.config import default_config


def get_config():
  c = default_config()
  c.name = "amazon"
  c.data.format = "sasrec"
  c.data.path = "../shared/data/amazon-video/Video.txt"
  c.data.max_len = 50
  c.model.d_model = 64
  c.model.n_heads = 2
  c.model.n_layers = 2
  c.model.d_ff = 256
  c.model.dropout = 0.5
  c.train.steps = 3000
  c.train.batch_size = 256
  c.train.lr = 1e-3
  c.train.warmup_steps = 100
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.select_on = "ndcg@10"
  c.train.checkpoint_every = 1000
  c.eval.batch_size = 512
  return c
