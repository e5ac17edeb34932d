"""The run schema: every field a run reads, with defaults, and its validation.

Experiment configs (experiments/configs/*.py) start from `default_config()` and
override fields; the config is then locked, so a misspelt `--config.x.y` is an
error instead of a silently ignored setting.
"""

from __future__ import annotations

import ml_collections

from jaxrec.mesh import MeshShape

DATA_FORMATS = ("auto", "movielens_csv", "movielens_dat", "sasrec")
PACKINGS = ("none", "greedy")
# What each user's sequence holds out of training (`data.holdout`) -> how many items:
#   valid_test  the last two: the second-to-last is the validation target, the last the
#               test target (the SASRec/BERT4Rec leave-one-out protocol).
#   test        the last only, the test target; no validation split. Training runs
#               through the item before it, as generative-recommenders' published
#               MovieLens and Amazon runs do (DatasetV2 with ignore_last_n=1).
HOLDOUTS = {"valid_test": 2, "test": 1}


def has_validation(holdout: str) -> bool:
  """Whether a holdout keeps a validation item out of training (one spelling of it)."""
  return HOLDOUTS[holdout] >= 2
POSITIONS = ("learned", "rope", "none")
MLPS = ("gelu", "relu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
DP_MODES = ("sync", "delayed", "local_sgd", "diloco")
LOCAL_MODES = ("local_sgd", "diloco")   # replicas take local steps between averages
LOCAL_SGD_STEPS = ("sqrt_replicas", "mean")
COMPRESSORS = ("none", "bf16", "int8", "topk", "powersgd", "sign")
OPTIMIZERS = ("adamw", "sgd")
HEADS = ("last", "spread", "auto")
# What the layer scan keeps for the backward pass (jax.checkpoint policies):
#   none                keep everything (no rematerialisation)
#   full                keep only each layer's input; recompute the layer
#   dots_saveable       keep matmul outputs, recompute the elementwise work
#   save_attention_out  keep each attention block's output (checkpoint_name)
REMAT_POLICIES = ("none", "full", "dots_saveable", "save_attention_out")
# A pipeline stage as a whole: "none" (the layers' own policy decides) or "full"
# (keep only the stage input between its forward and backward ticks).
PIPELINE_REMAT = ("none", "full")
ATTENTIONS = ("xla", "cudnn")
BLOCKS = ("sasrec", "hstu")
# the SASRec block: standard pre-norm, or the original paper's (and the HSTU table's) layout
SASREC_LAYOUTS = ("pre_norm", "original")
DROPOUT_PLACEMENTS = ("residual", "reference")
LOSS_TYPES = ("full", "sampled")
TABLE_SHARDINGS = ("tensor", "rows")
TABLE_OPTIMIZERS = ("adamw", "lazy_adam", "rowwise_adagrad")
ROW_GRADIENTS = ("exact", "bf16", "int8")
NEGATIVES = ("uniform", "in_batch", "mixed")
BALANCE_COSTS = ("device", "timed", "h100", "tpu_v5p", "local")
BASELINES = ("most_popular", "none")
EXCLUSIONS = ("history", "input", "none")


def check_exclusion(exclude: str) -> None:
  """`exclude` must name one of EXCLUSIONS (a caller still passing the old bool fails here)."""
  if exclude not in EXCLUSIONS:
    raise ValueError(f"exclude = {exclude!r}; valid values are {', '.join(EXCLUSIONS)}")


class ConfigError(ValueError):
  pass


# Fields added after checkpoints were first written whose default is not what those
# checkpoints did: a saved config without the field was trained with this value.
BEFORE_FIELD_EXISTED = {("model", "position_origin"): "end"}


def saved_config(saved: dict) -> ml_collections.ConfigDict:
  """A checkpoint's config on today's schema. Fields the checkpoint predates take the
  behaviour it was trained with (BEFORE_FIELD_EXISTED, else the default), so a run
  written by an older jaxrec still restores and resumes."""
  c = default_config()
  for (section, field), value in BEFORE_FIELD_EXISTED.items():
    c[section][field] = value

  def merge(into: ml_collections.ConfigDict, values: dict) -> None:
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(into.get(key), ml_collections.ConfigDict):
        merge(into[key], value)
      else:
        into[key] = value

  merge(c, saved)
  if c.pipeline.remat in (True, False):   # before remat policies: a bool
    c.pipeline.remat = "full" if c.pipeline.remat else "none"
  if "exclude_history" in c.eval:   # before eval.exclude: a bool and a scope
    c.eval.exclude = (c.eval.get("exclude_scope", "history") if c.eval.exclude_history
                      else "none")
    del c.eval["exclude_history"]
    if "exclude_scope" in c.eval:
      del c.eval["exclude_scope"]
  return c


# Fields a resumed run may change without changing what it learns: its length, how often
# it logs, evaluates and saves, the mesh and pipeline layout (a resume converts the state
# exactly), the input's read-ahead, and the remat / attention implementations.
RESUMABLE_CHANGES = ("name", "mesh", "train.steps", "train.log_every", "train.eval_every",
                     "train.checkpoint_every", "train.keep_checkpoints",
                     "train.preemption_check_every", "train.max_nonfinite_steps",
                     "train.inject_nonfinite_steps", "eval", "pipeline", "data.prefetch",
                     "model.remat", "model.attention")


def recipe_changes(saved: ml_collections.ConfigDict,
                   now: ml_collections.ConfigDict) -> list[str]:
  """`field: saved -> now` for each field outside RESUMABLE_CHANGES that differs: a
  resumed run that trains with another recipe than its checkpoint (a reused --workdir,
  a changed flag) should say so rather than splice two experiments silently."""

  def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
      if isinstance(value, dict):
        out.update(flat(value, f"{prefix}{key}."))
      else:
        out[prefix + key] = value
    return out

  def free(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in RESUMABLE_CHANGES)

  was, is_ = flat(saved.to_dict()), flat(now.to_dict())
  return [f"{k}: {was.get(k)!r} -> {is_.get(k)!r}" for k in sorted(set(was) | set(is_))
          if not free(k) and was.get(k) != is_.get(k)]


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "default"
  c.seed = 0
  # Mesh over axes replica,data,pipe,tensor; omitted axes are 1, one -1 is inferred.
  c.mesh = "data:-1"

  c.data = ml_collections.ConfigDict()
  c.data.format = "auto"      # auto: by file suffix (.csv, .dat, .txt)
  c.data.path = ""            # empty: the embedded ml-latest-small ratings.csv
  c.data.kcore = 0            # iterative k-core on users and items; 0 or 1 = off
  c.data.max_len = 50         # positions per training / evaluation sequence
  c.data.window_stride = 0    # >0: extra training windows every `stride` items back
  c.data.shuffle_seed = 0
  c.data.packing = "none"     # "greedy": several users' sequences per row (segment ids)
  c.data.holdout = "valid_test"  # HOLDOUTS: "test" trains through the validation item
  c.data.prefetch = 2         # host batches prepared ahead on a background thread

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 64
  c.model.n_heads = 2
  c.model.n_layers = 2
  c.model.d_ff = 256
  c.model.dropout = 0.2
  c.model.positions = "learned"
  c.model.mlp = "gelu"
  c.model.norm = "layernorm"
  c.model.embed_scale = True       # multiply item embeddings by sqrt(d_model), as SASRec
  c.model.item_table_multiple = 128  # rows padded to a multiple (mesh-independent shapes)
  c.model.dtype = "float32"        # compute dtype (matmuls, activations)
  c.model.param_dtype = "float32"  # storage dtype of the params (bf16 halves them)
  c.model.remat = "none"           # layer-scan rematerialisation policy (REMAT_POLICIES)
  c.model.attention = "xla"        # jax.nn.dot_product_attention: "xla", or "cudnn" on GPU
  c.model.block = "sasrec"         # "sasrec" (softmax attention + MLP) | "hstu" (pointwise)
  c.model.hstu_qk_dim = 0          # HSTU per-head query/key width; 0 = d_model / n_heads
  c.model.hstu_v_dim = 0           # HSTU per-head u/v width; 0 = d_model / n_heads
  c.model.time_bias = True         # HSTU: bucketed time-gap bias, where the data has times
  c.model.time_buckets = 128
  c.model.sasrec_layout = "pre_norm"  # | "original": K/V from the un-normalised x, post-norm
  # SASRec block's dropout: "residual" (attention and MLP outputs) | "reference" (attention
  # probabilities, MLP hidden and output: generative-recommenders' sasrec.py)
  c.model.dropout_placement = "residual"
  c.model.final_norm = True        # a norm after the last block (HSTU's encoder has none)
  # Positions count from each sequence's first item ("start": appending an item keeps
  # earlier positions, so serving can cache keys and values) or back from its last
  # item ("end": SASRec's right-aligned rows).
  c.model.position_origin = "start"
  c.model.init_std = 0.02          # weights of the blocks
  # Embedding inits (0 = jaxrec's own: item rows d^-1/2 when embed_scale, so the scaled
  # input has std 1, else init_std; learned positions init_std). generative-recommenders
  # starts items at 0.02 (x sqrt(d) at the input) and positions at sqrt(1/d), so the
  # two signals start equal; its recipes set these.
  c.model.item_init_std = 0.0
  c.model.position_init_std = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 128
  c.train.lr = 1e-3
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  # Adam's epsilon (optax's and PyTorch's 1e-8). The step is lr * m / (sqrt(v) + eps),
  # so rounding noise d in a near-zero gradient moves its weight by up to lr * d / eps.
  c.train.adam_eps = 1e-8
  c.train.grad_clip = 1.0     # global-norm clip; 0 = off
  c.train.optimizer = "adamw"  # adamw | sgd (plain SGD: for equivalence checks)
  c.train.opt_state_dtype = "float32"  # Adam moments' storage dtype (bf16 halves them)
  c.train.master_weights = True  # with bf16 params: keep an fp32 copy in the optimizer
  c.train.preemption_check_every = 10  # steps between cross-process preemption checks
  # "" or a validation metric (e.g. "ndcg@10"): keep the params of the evaluation
  # (every eval_every steps) with the best value and report test metrics for those.
  c.train.select_on = ""
  c.train.log_every = 50
  c.train.eval_every = 500    # 0 = only at the end
  c.train.checkpoint_every = 500  # 0 = only at the end
  c.train.keep_checkpoints = 2
  c.train.max_nonfinite_steps = 5  # stop after this many non-finite steps in a row
  c.train.inject_nonfinite_steps = ""  # fault injection: "5,6" poisons those steps

  c.loss = ml_collections.ConfigDict()
  c.loss.type = "full"          # full: tiled softmax over the whole catalogue | sampled
  c.loss.item_tile = 0          # items per tile of the full softmax; 0 = auto (4 MiB blocks)
  c.loss.token_chunk = 1024     # real targets scored per chunk (padding chunks are skipped)
  c.loss.negatives = "uniform"  # sampled: uniform | in_batch | mixed
  c.loss.num_negatives = 128    # sampled: uniform negatives per token (HSTU's ML-1M: 128)
  c.loss.shared_negatives = False  # True: one set of uniform negatives for the whole step
  c.loss.in_batch_global = True  # in-batch negatives gathered over the data axes
  c.loss.logq_correction = True  # subtract log(expected count) of each candidate
  c.loss.mask_history = False   # also mask negatives that are in the row's own items
  c.loss.l2_norm = False        # sampled: L2-normalised hidden states and item rows
  c.loss.temperature = 1.0      # sampled: logits / temperature (HSTU: 0.05 with l2_norm)

  c.embedding = ml_collections.ConfigDict()
  c.embedding.sharding = "tensor"     # "rows": rows and optimizer state over data x tensor
  c.embedding.shard_replica = False   # rows: also split over the replica axis
  c.embedding.optimizer = "adamw"     # adamw (as the dense params) | lazy_adam | rowwise_adagrad
  c.embedding.row_gradients = "exact"  # rows: looked-up rows' gradients travel to their owners
                                       # exact (compute dtype) | bf16 | int8 (one scale per row)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  # Which of a user's items leave the candidates: "history", every item the user had
  # before the target (SASRec's evaluation); "input", only those in the model's input
  # window (the last data.max_len), as generative-recommenders' eval.py does
  # (invalid_ids = the padded past_ids): the published HSTU table's protocol; "none",
  # every item stays a candidate. (The target itself is never removed.)
  c.eval.exclude = "history"
  c.eval.max_users = 0        # 0 = every user; >0 = the first N (quick validation)
  c.eval.baseline = "most_popular"  # a baseline scored next to the model: most_popular | none

  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.microbatches = 1
  c.pipeline.schedule = "gpipe"
  c.pipeline.virtual_stages = 1
  c.pipeline.layers_per_stage = "uniform"  # or "auto" (balanced) or counts: "3,3,2"
  c.pipeline.remat = "none"   # "full": keep only stage inputs, recompute in the backward
  # Where the item-softmax head runs: "last" stage, "spread" over every stage (each
  # scores 1/P of the catalogue), or "auto" (the balancer decides; needs
  # layers_per_stage="auto", else means "last").
  c.pipeline.head = "auto"
  # What an "auto" split is balanced on: "device" = the running device's published
  # profile (H100, TPU v5p) or, where there is none (CPU, others), timing the pieces;
  # "timed"; or a named profile's roofline ("h100", "tpu_v5p", "local" = fitted).
  c.pipeline.balance_costs = "device"
  c.pipeline.rebalance_every = 0     # >0: re-measure stage costs every N steps ...
  c.pipeline.rebalance_threshold = 0.1  # ... and re-split when max/mean > 1 + this

  c.dp = ml_collections.ConfigDict()
  c.dp.mode = "sync"
  c.dp.sync_every = 1         # H: local_sgd / diloco average every H steps
  # DiLoCo's outer Nesterov SGD. Douillard et al. 2023 use lr 0.7, momentum 0.9 for
  # language models with H in the hundreds; a steady outer gradient then moves
  # lr / (1 - momentum) = 7x the replicas' mean delta per outer step. On the ML-1M
  # recipe at H=16 that lost 80% NDCG@10 (valid .0224 vs sync .1148, 800 steps);
  # momentum 0.5 (1.4x) came within 1.8% (.1128). Set 0.9 for the paper's recipe.
  c.dp.outer_lr = 0.7
  c.dp.outer_momentum = 0.5
  # local_sgd's outer step: the replicas' mean delta ("mean", plain model averaging),
  # or that times sqrt(R) ("sqrt_replicas"). Each replica's Adam normalises a gradient
  # taken on 1/R of the batch, so where noise dominates its second moment its step
  # along the mean gradient is up to sqrt(R) smaller than sync's (Adam's square-root
  # scaling rule, Malladi et al. 2022), and averaging does not undo that. Measured on
  # ML-1M, data:8, the rows hybrid (docs/design.md): at H=4 over 4,800 steps
  # "sqrt_replicas" ended -1.5% / +1.9% against sync's best valid NDCG@10 (two seeds;
  # "mean" -5.2%), but behind it early (-7.9% at 800 steps, "mean" -0.5%); at H=16 it
  # diverged (-82% at 800 steps; "mean" -1.1% on the pre-norm block), so it is opt-in.
  c.dp.local_sgd_step = "mean"
  # Steps over which the sqrt(R) factor ramps linearly from 1: early on the gradient's
  # signal dominates Adam's second moment and the mean is the right step. 0: no ramp.
  c.dp.local_sgd_warmup = 0

  c.compression = ml_collections.ConfigDict()
  c.compression.method = "none"
  c.compression.error_feedback = True
  c.compression.hierarchical = False  # reduce over data first, compress across replica
  c.compression.block = 256           # int8 / sign: entries per fp32 scale
  c.compression.stochastic_rounding = False  # int8
  c.compression.ratio = 0.01          # topk: fraction of entries sent
  c.compression.momentum = 0.0        # topk: DGC momentum correction (use with SGD)
  c.compression.chunk = 16384         # topk: top-k rows are capped at this length
  c.compression.warmup_steps = 0      # topk: DGC sparsity warm-up over these steps
  c.compression.rank = 4              # powersgd
  c.compression.min_size = 4096       # tensors with fewer entries go uncompressed
  return c


def validate(c: ml_collections.ConfigDict, mesh: MeshShape) -> None:
  """Raises ConfigError naming the field, its value and what would be valid."""
  _choice(c, "data.format", DATA_FORMATS)
  _choice(c, "data.packing", PACKINGS)
  _choice(c, "data.holdout", tuple(HOLDOUTS))
  _choice(c, "model.positions", POSITIONS)
  _choice(c, "model.mlp", MLPS)
  _choice(c, "model.norm", NORMS)
  _choice(c, "model.dtype", DTYPES)
  _choice(c, "pipeline.schedule", SCHEDULES)
  _choice(c, "dp.mode", DP_MODES)
  _choice(c, "compression.method", COMPRESSORS)
  _choice(c, "train.optimizer", OPTIMIZERS)
  _choice(c, "pipeline.head", HEADS)
  _choice(c, "model.param_dtype", DTYPES)
  _choice(c, "model.remat", REMAT_POLICIES)
  _choice(c, "model.attention", ATTENTIONS)
  _choice(c, "model.block", BLOCKS)
  _choice(c, "model.sasrec_layout", SASREC_LAYOUTS)
  if c.model.block != "sasrec" and c.model.sasrec_layout != "pre_norm":
    raise ConfigError(f"config.model.sasrec_layout = {c.model.sasrec_layout!r} applies to "
                     f"model.block = 'sasrec' only (this model: {c.model.block!r}); "
                     "leave it 'pre_norm'")
  _choice(c, "model.dropout_placement", DROPOUT_PLACEMENTS)
  if c.model.block != "sasrec" and c.model.dropout_placement != "residual":
    raise ConfigError(f"config.model.dropout_placement = {c.model.dropout_placement!r} "
                      f"applies to model.block = 'sasrec' only (this model: "
                      f"{c.model.block!r}); leave it 'residual'")
  _choice(c, "model.position_origin", ("start", "end"))
  _choice(c, "pipeline.remat", PIPELINE_REMAT)
  _choice(c, "pipeline.balance_costs", BALANCE_COSTS)
  _choice(c, "train.opt_state_dtype", DTYPES)
  _choice(c, "eval.baseline", BASELINES)
  _choice(c, "eval.exclude", EXCLUSIONS)
  _choice(c, "loss.type", LOSS_TYPES)
  _choice(c, "embedding.sharding", TABLE_SHARDINGS)
  _choice(c, "embedding.optimizer", TABLE_OPTIMIZERS)
  if c.embedding.sharding == "rows":
    if (c.dp.mode in LOCAL_MODES and mesh.replica > 1 and
        not c.embedding.shard_replica):
      # The hybrid keeps the rows table synchronous (one owner per row); copies over
      # replica would need their own all-reduce every step, which the local modes
      # exist to avoid.
      raise ConfigError(
          f"config.dp.mode = {c.dp.mode!r} with config.embedding.sharding = 'rows' keeps "
          f"the table synchronous, split over every data axis; the mesh has replica = "
          f"{mesh.replica}: set config.embedding.shard_replica = True")
    if c.pipeline.head == "spread" and mesh.pipe > 1:
      raise ConfigError("config.pipeline.head = 'spread' splits the table over pipe; with "
                        "config.embedding.sharding = 'rows' use pipeline.head = 'last'")
    group = mesh.data * mesh.tensor * (mesh.replica if c.embedding.shard_replica else 1)
    if c.model.item_table_multiple % group:
      raise ConfigError(
          f"config.embedding.sharding = 'rows' splits the item table over {group} devices "
          f"(data x tensor{' x replica' if c.embedding.shard_replica else ''}); "
          f"config.model.item_table_multiple = {c.model.item_table_multiple} must be "
          f"divisible by {group}")
  _choice(c, "embedding.row_gradients", ROW_GRADIENTS)
  if c.embedding.row_gradients != "exact" and c.embedding.sharding != "rows":
    raise ConfigError(
        f"config.embedding.row_gradients = {c.embedding.row_gradients!r} compresses the "
        "rows-sharded table's sparse gradient exchange; with embedding.sharding = "
        f"{c.embedding.sharding!r} there is none. Use embedding.sharding = 'rows' or "
        "row_gradients = 'exact' (the dense gradients use compression.method)")
  if c.embedding.optimizer != "adamw" and c.train.optimizer != "adamw":
    raise ConfigError(f"config.embedding.optimizer = {c.embedding.optimizer!r} needs "
                      f"config.train.optimizer = 'adamw' (got {c.train.optimizer!r})")
  _choice(c, "loss.negatives", NEGATIVES)
  for field in ("loss.token_chunk", "loss.num_negatives", "loss.temperature",
                "train.adam_eps"):
    if _get(c, field) <= 0:
      raise ConfigError(f"config.{field} = {_get(c, field)} must be positive")
  if c.loss.item_tile < 0:
    raise ConfigError(f"config.loss.item_tile = {c.loss.item_tile} must be >= 0 (0 = auto)")
  if c.loss.type == "sampled" and c.pipeline.head == "spread" and mesh.pipe > 1:
    raise ConfigError(
        "config.pipeline.head = 'spread' splits the full softmax over the stages; with "
        "config.loss.type = 'sampled' the head is small: use pipeline.head = 'last'")
  if c.pipeline.head == "spread" and mesh.pipe > 1 and (
      c.model.item_table_multiple % (mesh.tensor * mesh.pipe)):
    raise ConfigError(
        f"config.pipeline.head = 'spread' splits the item table over tensor x pipe = "
        f"{mesh.tensor * mesh.pipe} devices; config.model.item_table_multiple = "
        f"{c.model.item_table_multiple} must be divisible by it")
  if c.dp.sync_every < 1:
    raise ConfigError(f"config.dp.sync_every = {c.dp.sync_every} must be >= 1")
  _choice(c, "dp.local_sgd_step", LOCAL_SGD_STEPS)
  if c.dp.local_sgd_warmup < 0:
    raise ConfigError(f"config.dp.local_sgd_warmup = {c.dp.local_sgd_warmup} must be >= 0 "
                      "(steps; 0 = no ramp)")
  if c.dp.local_sgd_warmup > 0 and c.dp.local_sgd_step != "sqrt_replicas":
    raise ConfigError(
        f"config.dp.local_sgd_warmup = {c.dp.local_sgd_warmup} ramps local_sgd's sqrt(R) "
        f"factor, but dp.local_sgd_step = {c.dp.local_sgd_step!r} has none to ramp: set "
        "dp.local_sgd_step=sqrt_replicas, or dp.local_sgd_warmup=0")
  if not c.dp.outer_lr > 0:
    raise ConfigError(f"config.dp.outer_lr = {c.dp.outer_lr} must be > 0 (DiLoCo's outer "
                      "SGD learning rate; the paper's is 0.7)")
  if not 0 <= c.dp.outer_momentum < 1:
    raise ConfigError(f"config.dp.outer_momentum = {c.dp.outer_momentum} must be in "
                      "[0, 1) (0: plain outer SGD; the paper's Nesterov momentum is 0.9)")
  if c.compression.block <= 0 or c.compression.block % 8:
    raise ConfigError(
        f"config.compression.block = {c.compression.block} must be a positive multiple of 8")
  if not 0.0 < c.compression.ratio <= 1.0:
    raise ConfigError(f"config.compression.ratio = {c.compression.ratio} must be in (0, 1]")
  if c.compression.rank < 1:
    raise ConfigError(f"config.compression.rank = {c.compression.rank} must be >= 1")
  if c.compression.hierarchical and mesh.replica == 1:
    raise ConfigError(
        "config.compression.hierarchical needs a replica axis > 1 (the slow links to "
        f"compress across); the mesh is {mesh}")
  for field in ("model.d_model", "model.n_heads", "model.n_layers", "model.d_ff",
                "data.max_len", "train.steps", "train.batch_size", "eval.batch_size",
                "pipeline.microbatches", "pipeline.virtual_stages",
                "model.item_table_multiple"):
    if _get(c, field) <= 0:
      raise ConfigError(f"config.{field} = {_get(c, field)} must be positive")
  m = c.model
  if m.d_model % m.n_heads:
    raise ConfigError(
        f"config.model.d_model = {m.d_model} is not divisible by "
        f"config.model.n_heads = {m.n_heads}")
  if m.positions == "rope" and (m.d_model // m.n_heads) % 2:
    raise ConfigError(f"rotary positions need an even head dim, got {m.d_model // m.n_heads}")
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f"config.model.dropout = {m.dropout} must be in [0, 1)")
  if m.n_heads % mesh.tensor:
    raise ConfigError(
        f"config.model.n_heads = {m.n_heads} is not divisible by the tensor axis "
        f"({mesh.tensor}); choose a tensor size that divides it")
  if m.d_ff % mesh.tensor:
    raise ConfigError(
        f"config.model.d_ff = {m.d_ff} is not divisible by the tensor axis ({mesh.tensor})")
  if m.item_table_multiple % mesh.tensor:
    raise ConfigError(
        f"config.model.item_table_multiple = {m.item_table_multiple} is not divisible by "
        f"the tensor axis ({mesh.tensor}); the item table is padded to that multiple and "
        "split evenly over tensor")
  d = mesh.data_size
  if c.train.batch_size % d:
    raise ConfigError(
        f"config.train.batch_size = {c.train.batch_size} is not divisible by the data "
        f"axes (replica x data = {d}); use a multiple of {d}")
  if c.eval.batch_size % d:
    raise ConfigError(
        f"config.eval.batch_size = {c.eval.batch_size} is not divisible by the data axes "
        f"(replica x data = {d}); use a multiple of {d}")
  per_replica = c.train.batch_size // d
  if per_replica % c.pipeline.microbatches:
    raise ConfigError(
        f"config.pipeline.microbatches = {c.pipeline.microbatches} does not divide the "
        f"per-replica batch ({c.train.batch_size} / {d} = {per_replica})")
  if mesh.pipe > 1 and (c.eval.batch_size // d) % mesh.pipe:
    raise ConfigError(
        f"config.eval.batch_size = {c.eval.batch_size}: the per-replica eval batch "
        f"({c.eval.batch_size // d}) must be divisible by the pipe axis ({mesh.pipe}), "
        "which splits it into microbatches")
  if c.train.select_on:
    from_metrics = {f"{m}@{k}" for m in ("hr", "ndcg") for k in (1, 5, 10, 20, 50)} | {"mrr"}
    if c.train.select_on not in from_metrics:
      raise ConfigError(f"config.train.select_on = {c.train.select_on!r}; valid values are '' "
                        f"or one of {sorted(from_metrics)}")
    if not c.train.eval_every:
      raise ConfigError("config.train.select_on needs config.train.eval_every > 0 (the "
                        "validation evaluations it selects from)")
    if not has_validation(c.data.holdout):
      raise ConfigError(f"config.train.select_on = {c.train.select_on!r} selects on the "
                        f"validation split, which config.data.holdout = {c.data.holdout!r} "
                        "trains on; "
                        "set train.select_on='' (the last step is reported) or "
                        "data.holdout='valid_test'")
  for field in ("train.log_every", "train.eval_every", "train.checkpoint_every",
                "train.preemption_check_every", "data.prefetch",
                "model.init_std", "model.item_init_std", "model.position_init_std"):
    if not _get(c, field) >= 0:   # (NaN fails too)
      raise ConfigError(f"config.{field} = {_get(c, field)} must be >= 0")


def _get(c: ml_collections.ConfigDict, dotted: str):
  node = c
  for key in dotted.split("."):
    node = node[key]
  return node


def _choice(c: ml_collections.ConfigDict, dotted: str, valid: tuple[str, ...]) -> None:
  value = _get(c, dotted)
  if value not in valid:
    raise ConfigError(f"config.{dotted} = {value!r}; valid values are {', '.join(valid)}")


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set (`{"pipeline.schedule": "1f1b"}`): what
  `--config.<field>=` does on the command line, for sweeps and planners."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c
