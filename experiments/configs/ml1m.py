"""MovieLens-1M, the SASRec-CE recipe (full-softmax CE, 2 blocks, 200 positions).

Reads the official `ratings.dat` or the SASRec-format `ml-1m.txt` (format chosen
by suffix); the dataset's licence forbids redistribution, so give its path:
  python -m experiments.train --config=experiments/configs/ml1m.py \
      --config.data.path=/path/to/ml-1m/ratings.dat --workdir=runs/ml1m
"""

from jaxrec.config import default_config


def get_config():
  c = default_config()
  c.name = "ml1m"
  c.data.path = "../shared/data/ml-1m/ml-1m.txt"
  c.data.max_len = 200
  c.model.d_model = 64
  c.model.n_heads = 2
  c.model.n_layers = 2
  c.model.d_ff = 256
  c.model.dropout = 0.2
  c.train.steps = 3000
  c.train.batch_size = 128
  c.train.lr = 1e-3
  c.train.warmup_steps = 100
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.eval.batch_size = 256
  return c
