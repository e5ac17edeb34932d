"""MovieLens-1M, SASRec-CE: the HSTU table's SASRec recipe with the full softmax.

The architecture and training recipe of HSTU's published SASRec row
(generative-recommenders, configs/ml-1m/sasrec-sampled-softmax-n128-final.gin):
2 blocks, 1 head, d=50, a ReLU feed-forward of width 50, dropout 0.2, 200 positions,
batch 128, AdamW lr 1e-3 with no decay, schedule or clipping, ~100 epochs — with the
full softmax over the catalogue (SASRec-CE) instead of 128 sampled negatives
(`ml1m_sampled.py` keeps those). The checkpoint reported is the one with the best
validation NDCG@10 (evaluated every 5 epochs). The block is the reference's
(`reference_block`): under the published split and the published exclusion (only
the input window removed from the candidates) it ended at test NDCG@10 .1608 / HR@10
.2851 (published .1603 / .2853), .1633 / .2907 with the whole history removed (one
seed, last of 4,800 steps, 8 faked CPU devices; docs/design.md);
jaxrec's pre-norm block (`recipe()`, what the data-parallel comparisons in
docs/design.md ran) at .1592 / .2808 selected on validation.

Reads the official `ratings.dat` or the SASRec-format `ml-1m.txt` (format chosen by
suffix); the dataset's licence forbids redistribution, so give its path:
  python -m experiments.train --config=experiments/configs/ml1m.py \
      --config.data.path=/path/to/ml-1m/ratings.dat --workdir=runs/ml1m
"""

from jaxrec.config import default_config

EPOCH = 48   # steps: 6040 users / 128


def reference_block(c):
  """generative-recommenders' SASRec block (in place; returns it): the original SASRec
  layout (keys and values from the un-normalised input, post-norm feed-forward), no
  norm after the last block, dropout on the attention probabilities and inside the
  feed-forward instead of on the residual branches."""
  c.model.sasrec_layout = "original"
  c.model.final_norm = False
  c.model.dropout_placement = "reference"
  return c


def get_config():
  c = reference_block(recipe())
  c.name = "ml1m"
  return c


def recipe():
  """The data, model size and training recipe, on jaxrec's default (pre-norm) block:
  what the HSTU configs build on, and the block the data-parallel comparisons ran."""
  c = default_config()
  c.name = "ml1m_prenorm"
  c.data.path = "../shared/data/ml-1m/ml-1m.txt"
  c.data.max_len = 200
  c.model.d_model = 50
  c.model.n_heads = 1
  c.model.n_layers = 2
  c.model.d_ff = 50
  c.model.mlp = "relu"
  c.model.dropout = 0.2
  c.model.item_table_multiple = 128
  c.loss.type = "full"
  c.train.steps = 100 * EPOCH
  c.train.batch_size = 128
  c.train.lr = 1e-3
  c.train.b2 = 0.98
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 0
  c.train.min_lr_ratio = 1.0    # constant learning rate, as the published recipe
  c.train.grad_clip = 0.0
  c.train.log_every = EPOCH
  c.train.eval_every = 5 * EPOCH
  c.train.checkpoint_every = 5 * EPOCH
  c.train.select_on = "ndcg@10"
  c.eval.batch_size = 256
  return c
