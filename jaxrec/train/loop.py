"""The training loop: data -> compiled steps -> metrics, evaluation and checkpoints.

Nothing a user trained is lost:
  * a rerun with the same workdir resumes from the latest checkpoint, exactly: the
    state holds the step, optimizer, compressor, async-mode and RNG state, and the
    data stream is a pure function of the step (the grain iterator's state, saved
    with each checkpoint, says where the current epoch starts);
  * SIGTERM / SIGINT (preemption) saves at the next step boundary and returns;
  * a checkpoint that cannot be read falls back to the previous one, with a warning;
  * a checkpoint written on another mesh or pipeline layout is converted;
  * non-finite steps are skipped (state unchanged) and counted; after
    `train.max_nonfinite_steps` in a row the run stops with its last good
    checkpoint untouched.
"""

from __future__ import annotations

import collections
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxrec.config import recipe_changes, saved_config, validate, with_overrides
from jaxrec.data import Dataset, load_dataset
from jaxrec.data.batches import TrainStream, process_rows, to_global
from jaxrec.data.pipeline import train_batches
from jaxrec.eval.evaluator import evaluate
from jaxrec.eval.metrics import popularity_metrics
from jaxrec.mesh import make_mesh, mesh_shape
from jaxrec.models.recommender import RecommenderFns
from jaxrec.train import remesh
from jaxrec.train.checkpoint import (Checkpointer, CheckpointCorruptError,
                                     CheckpointMismatchError, CheckpointReadError,
                                     check_compatible, dump_json, param_shapes)
from jaxrec.parallel import balance
from jaxrec.train.step import TrainProgram, measure_piece_costs

# The host may dispatch this many steps ahead of the devices. Unbounded run-ahead
# deadlocked XLA's CPU client with 8 faked devices: queued steps held every
# per-device execution slot while running ones waited in a collective for a
# device whose next launch could not get a slot. Two keeps the host busy ahead of
# the devices without that risk (and bounds how late a non-finite step is seen).
MAX_STEPS_IN_FLIGHT = 2

PROTOCOL = ("leave-one-out ({holdout}), full ranking over all items, {history}, ties "
            "counted against the target")
HOLDOUT_WORDS = {"valid_test": "last two items held out: validation, test",
                 "test": "last item held out: test; trained through the validation item"}
EXCLUSION_WORDS = {
    "history": "history items removed from the candidates",
    "input": "the input window's items (the last max_len) removed from the candidates",
    "none": "history items kept as candidates"}


class NonFiniteTrainingError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl (process 0 only)."""

  def __init__(self, path: Path):
    self.path = path
    self.enabled = jax.process_index() == 0

  def write(self, record: dict[str, Any]) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a request to stop at the next step boundary.

  With several processes every one must stop at the same step. JAX's own preemption
  service (`reached_preemption_sync_point`, where jax.distributed runs it) is asked
  every step — it agrees on a step in the background, without a collective. Our own
  signal flag is shared by an all-gather only every `check_every` steps, which keeps
  that cross-process exchange far below 1% of the step time.
  """

  def __init__(self, check_every: int = 1):
    self.check_every = max(int(check_every), 1)
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal = signum
    logging.warning("received %s: saving at the next step boundary, then stopping",
                    signal.Signals(signum).name)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step` (every process gets the same answer)."""
    flag = self.signal is not None
    if jax.process_count() == 1:
      return flag
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        return True
    except RuntimeError:   # the preemption service is not running in this job
      pass
    if step % self.check_every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def protocol(config: ml_collections.ConfigDict) -> str:
  """The evaluation protocol in words, as the summary records it."""
  return PROTOCOL.format(holdout=HOLDOUT_WORDS[config.data.holdout],
                         history=EXCLUSION_WORDS[config.eval.exclude])


def build(config: ml_collections.ConfigDict, dataset: Dataset | None = None):
  """Mesh, dataset, model functions and compiled program for a config."""
  mesh = make_mesh(config.mesh)
  validate(config, mesh_shape(mesh))
  dataset = dataset or load_dataset(config.data, config.eval.max_users)
  fns = RecommenderFns.from_config(config, dataset.num_items)
  if fns.uses_time and not dataset.has_time:
    logging.warning("model.time_bias is on but %s has no timestamps (SASRec format keeps "
                    "only the order): the HSTU time bias is off for this run, the position "
                    "bias stays", dataset.source)
    config = with_overrides(config, {"model.time_bias": False})
    fns = RecommenderFns.from_config(config, dataset.num_items)
  return mesh, dataset, fns, TrainProgram(config, fns, mesh)


def checkpoint_meta(program: TrainProgram, step: int,
                    wall_s: float | None = None) -> dict[str, Any]:
  """What a checkpoint records beside the arrays. `wall_s`: the run's wall time up to
  this save, summed over every resumed segment (so a run spread over several
  processes still reports what it cost)."""
  meta = {"data_position": step, "config": program.config.to_json(),
          "num_items": program.fns.cfg.num_items,
          "mesh": str(program.shape), "param_shapes": param_shapes(program.fns.shapes),
          "layers_per_stage": list(program.layout.stages.layers_per_stage),
          "head": "spread" if program.layout.head_spread else "last"}
  if wall_s is not None:
    meta["wall_s"] = wall_s
  return meta


def restore(ckpt: Checkpointer, step: int, program: TrainProgram):
  """The state saved at `step`, on this program's mesh and layout."""
  meta = ckpt.read_meta(step)
  check_compatible(meta.get("param_shapes", {}), param_shapes(program.fns.shapes),
                   ckpt.directory / str(step))
  saved = saved_config(json.loads(meta["config"])) if "config" in meta else None
  saved_model = saved.model if saved is not None else None
  # params of the same shapes that mean something else: refuse rather than mislearn
  for field in ("position_origin", "block"):
    was, now = (saved_model or {}).get(field), getattr(program.fns.cfg, field)
    if saved_model is not None and was != now:
      raise CheckpointMismatchError(
          f"checkpoint {ckpt.directory / str(step)} was trained with model.{field} = "
          f"{was!r}; this run has {now!r}. Resume with --config.model.{field}={was} or "
          "use a fresh --workdir")
  changes = recipe_changes(saved, program.config) if saved is not None else []
  if changes:   # the same params trained on differently from here: resume, but say so
    logging.warning("checkpoint %s was trained with another recipe; this run continues "
                    "with its own (%s). Pass the checkpoint's values to keep its recipe, "
                    "or use a fresh --workdir to start over", ckpt.directory / str(step),
                    "; ".join(changes))
  old = remesh.saved_program(program, meta)
  if remesh.same_layout(program, old):
    return ckpt.restore(step, program.abstract_state())
  logging.info("checkpoint %d was written on mesh %s; converting to %s", step, old.shape,
               program.shape)
  return remesh.convert(program, old, ckpt.restore(step, remesh.replicated_targets(program, old)))


def restore_latest(ckpt: Checkpointer, program: TrainProgram):
  """The newest readable checkpoint's state. A checkpoint shown to be broken is moved
  aside and the previous one is tried; a read error that does not prove that (an
  I/O time-out, still failing after retries) stops the run with every checkpoint
  left where it is."""
  steps = sorted(ckpt.all_steps(), reverse=True)
  failures = []
  for step in steps:
    try:
      return restore(ckpt, step, program)
    except CheckpointMismatchError:
      raise
    except CheckpointCorruptError as e:
      failures.append(f"step {step}: {e}")
      moved = ckpt.quarantine(step)
      logging.warning("checkpoint at step %d could not be restored (%s); moved it to %s and "
                      "falling back to the previous one", step, failures[-1], moved)
    except Exception as e:  # noqa: BLE001  (not a broken file: stop, move nothing)
      raise CheckpointReadError(
          f"checkpoint {ckpt.directory / str(step)} could not be restored "
          f"({type(e).__name__}: {str(e)[:300]}); it was left in place because the error "
          "does not show its files are broken (a file-system error, or this code could "
          "not interpret it). Fix that and rerun to resume.") from e
  if steps:
    raise RuntimeError(f"no checkpoint in {ckpt.directory} could be restored:\n  " +
                       "\n  ".join(failures))
  return None


def rebalance(program: TrainProgram, state):
  """Re-measures the pipeline's stage costs; when the slowest stage exceeds the mean by
  more than the threshold, re-splits the layers and moves params and optimizer state
  to the new layout (exactly: a re-layout, nothing is recomputed or dropped)."""
  pcfg = program.config.pipeline
  lay = program.layout
  costs = measure_piece_costs(program.config, program.fns, program.mesh)
  head = "spread" if lay.head_spread else "last"
  current = balance.stage_costs(costs, lay.stages.layers_per_stage, lay.mesh.pipe, head)
  now = balance.imbalance(current)
  if now <= 1.0 + pcfg.rebalance_threshold:
    return program, state, None
  heads = ("last", "spread") if pcfg.head == "auto" else (head,)
  best = balance.plan(costs, program.fns.cfg.n_layers, lay.mesh.pipe, pcfg.virtual_stages,
                      pcfg.schedule, lay.microbatches, heads)
  if best.layers_per_stage == lay.stages.layers_per_stage and best.head == head:
    return program, state, None
  config = with_overrides(program.config, {
      "pipeline.layers_per_stage": ",".join(str(c) for c in best.layers_per_stage),
      "pipeline.head": best.head})
  new = TrainProgram(config, program.fns, program.mesh)
  state = remesh.convert(new, program, state)
  logging.info("re-balanced the pipeline: %s (%s head, imbalance %.3f) -> %s (%s head, %.3f)",
               list(lay.stages.layers_per_stage), head, now, list(best.layers_per_stage),
               best.head, best.imbalance)
  return new, state, {"rebalanced": list(best.layers_per_stage), "head": best.head,
                      "imbalance_before": now, "imbalance_after": best.imbalance,
                      "costs": costs.source}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       stop_after: int | None = None) -> dict[str, Any] | None:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the summary.

  Returns None without a final evaluation when the run stopped early: after
  `stop_after` steps (a planned interruption) or on SIGTERM / SIGINT.
  """
  wall_start = time.perf_counter()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh, dataset, fns, program = build(config)
  logging.info("data: %s (%s); %d training windows", dataset.description, dataset.source,
               len(dataset.train))
  logging.info("model: %.2fM params; mesh %s over %d %s devices", fns.num_params() / 1e6,
               mesh_shape(mesh), mesh.size, jax.devices()[0].platform)

  ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
  metrics = MetricsWriter(workdir / "metrics.jsonl")
  total = config.train.steps
  state = restore_latest(ckpt, program)
  if state is None:
    state = program.init_state(config.seed)
  else:
    logging.info("resumed from %s at step %d", ckpt.directory, int(jax.device_get(state.step)))
  start_step = int(jax.device_get(state.step))
  # wall time the restored state already cost (None: written before it was recorded)
  wall_before = ckpt.read_meta(start_step).get("wall_s") if start_step else 0.0

  def total_wall() -> float | None:
    """The run's wall time so far, every segment's (None: resumed from an older record)."""
    return None if wall_before is None else wall_before + time.perf_counter() - wall_start

  stream = TrainStream(dataset.train, config.train.batch_size, config.data.shuffle_seed,
                       config.data.packing, with_times=fns.uses_time)
  rows = process_rows(mesh, config.train.batch_size)
  data_state = ckpt.read_data_state(start_step) if start_step else None
  batches = train_batches(stream, rows, start_step, config.data.prefetch)
  if data_state:
    batches.set_state(data_state)
  if config.data.packing != "none":
    logging.info("packing %s: %.1f%% of row positions hold real targets (epoch 0)",
                 config.data.packing, 100 * stream.fill_rate(0))
  evaluate_split = _evaluator(config, program, mesh, dataset)

  last_log_time, last_log_step, tokens_since = time.perf_counter(), start_step, 0.0
  in_flight: collections.deque = collections.deque()
  streak = {"bad": 0, "skipped": 0}

  def drain(keep: int) -> None:
    """Reads the metrics of all but the newest `keep` dispatched steps: counts
    skipped (non-finite) steps and stops the run after too many in a row."""
    while len(in_flight) > keep:
      seen_step, seen = in_flight.popleft()
      seen = jax.device_get(seen)
      if not int(seen["skipped"]):
        streak["bad"] = 0
        continue
      streak["bad"] += 1
      streak["skipped"] += 1
      logging.warning("step %d: non-finite loss %s or gradient norm %s; skipped (%d in a row, "
                      "%d in all)", seen_step + 1, seen["loss"], seen["grad_norm"],
                      streak["bad"], streak["skipped"])
      metrics.write({"step": seen_step + 1, "skipped": 1, "loss": float(seen["loss"])})
      if streak["bad"] >= config.train.max_nonfinite_steps:
        ckpt.close()
        last = ckpt.latest_step()
        raise NonFiniteTrainingError(
            f"{streak['bad']} consecutive steps had a non-finite loss or gradient (last at "
            f"step {seen_step + 1}); stopping. The last good checkpoint "
            f"({'step ' + str(last) if last is not None else 'none yet'}) in "
            f"{ckpt.directory} is intact; lower train.lr or check the data.")

  selector = BestSelector(config, workdir, program)

  def validate_and_select(step: int) -> dict[str, float] | None:
    """The periodic evaluation: validation (and selection on it); with no validation
    split (data.holdout = 'test') the test split, as generative-recommenders reports
    it during training — nothing is selected on it."""
    if dataset.valid is None:
      if step != total:
        metrics.write({"step": step, "split": "test", **evaluate_split(state, "test")})
      return None
    valid = evaluate_split(state, "valid")
    metrics.write({"step": step, "split": "valid", **valid})
    selector.consider(step, valid, state)
    return valid

  def save(step: int) -> None:
    drain(0)
    if streak["bad"]:
      logging.warning("not checkpointing step %d during a run of non-finite steps", step)
      return
    ckpt.save(step, state, checkpoint_meta(program, step, total_wall()), batches.get_state())

  with PreemptionGuard(config.train.preemption_check_every) as guard:
    for step in range(start_step, total):
      batch = to_global(mesh, next(batches), config.train.batch_size)
      tokens_since += stream.tokens(step)
      state, step_metrics = program.train_step(state, batch, step)
      in_flight.append((step, step_metrics))
      done = step + 1
      drain(0 if done == total else MAX_STEPS_IN_FLIGHT)
      if config.train.log_every and (done % config.train.log_every == 0 or done == total):
        m = jax.device_get(step_metrics)
        now = time.perf_counter()
        dt = (now - last_log_time) / max(done - last_log_step, 1)
        record = {"step": done, "loss": float(m["loss"]), "lr": program.learning_rate(step),
                  "grad_norm": float(m["grad_norm"]), "step_time_s": dt,
                  "tokens_per_sec": tokens_since / max(now - last_log_time, 1e-9),
                  "epoch": stream.epoch_of(done), "skipped_steps": streak["skipped"]}
        metrics.write(record)
        logging.info("step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  %.0f tokens/s  ETA %s",
                     done, total, record["loss"], record["lr"], 1.0 / max(dt, 1e-9),
                     record["tokens_per_sec"], _eta(dt * (total - done)))
        last_log_time, last_log_step, tokens_since = now, done, 0.0
      if config.train.eval_every and done % config.train.eval_every == 0 and done != total:
        drain(0)
        validate_and_select(done)
      if config.train.checkpoint_every and done % config.train.checkpoint_every == 0:
        save(done)
      every = config.pipeline.rebalance_every
      if program.layout.pipe_axis and every and done % every == 0 and done < total:
        drain(0)
        program, state, record = rebalance(program, state)
        if record:
          metrics.write({"step": done, **record})
          evaluate_split = _evaluator(config, program, mesh, dataset)
      preempted = guard.requested(done)
      if done < total and (preempted or (stop_after is not None and done >= stop_after)):
        if ckpt.latest_step() != done:
          save(done)
        ckpt.close()
        logging.warning("stopped after step %d (%s); checkpoint saved in %s; rerun with the "
                        "same workdir to resume", done,
                        "preempted" if preempted else "as asked", ckpt.directory)
        return None

  if ckpt.latest_step() != total:
    save(total)
  valid = validate_and_select(total)
  test = evaluate_split(state, "test")
  metrics.write({"step": total, "split": "test", **test})
  ckpt.close()
  final = {"step": total, "valid": valid, "test": test}
  selected = None
  if selector.enabled:
    best_step, best_state = selector.best(state, program)
    if best_step != total:
      valid, test = evaluate_split(best_state, "valid"), evaluate_split(best_state, "test")
      metrics.write({"step": best_step, "split": "test", "selected": True, **test})
    selected = {"on": f"valid {config.train.select_on}", "step": best_step}
    selector.close()
  baseline = _most_popular(config, dataset, "test") if jax.process_index() == 0 else None
  summary = {
      "test": test, "valid": valid, "selected": selected, "final": final,
      "baseline_most_popular_test": baseline,
      "protocol": protocol(config),
      "wall_time_s": time.perf_counter() - wall_start,   # this process
      "total_wall_s": total_wall(),   # every segment's, up to each resumed checkpoint
      "steps": total, "resumed_from_step": start_step if start_step else None,
      "skipped_steps": streak["skipped"],
      "mesh": str(mesh_shape(mesh)), "device": f"{mesh.size}x {jax.devices()[0].device_kind}",
      "num_params": fns.num_params(), "dataset": dataset.description,
      "data_source": dataset.source, "config": config.to_dict(),
  }
  if jax.process_index() == 0:
    dump_json(workdir / "summary.json", summary)
  logging.info("test  HR@10 %.4f  NDCG@10 %.4f  MRR %.4f; %s", test["hr@10"], test["ndcg@10"],
               test["mrr"], summary["protocol"])
  if baseline:
    logging.info("most-popular baseline: HR@10 %.4f NDCG@10 %.4f", baseline["hr@10"],
                 baseline["ndcg@10"])
  return summary


class BestSelector:
  """Keeps the state of the best validation evaluation (`train.select_on`) in
  workdir/best, so the reported test metrics are those of the selected step (early
  stopping on validation, as the published tables are made). Survives a resume: the
  best value so far is read back from the saved meta."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path, program: TrainProgram):
    self.metric = config.train.select_on
    self.enabled = bool(self.metric)
    self.program = program
    self.value, self.step = -np.inf, None
    if self.enabled:
      self.ckpt = Checkpointer(workdir / "best", keep=1, async_save=False)
      last = self.ckpt.latest_step()
      if last is not None:
        meta = self.ckpt.read_meta(last)
        self.value, self.step = float(meta["selected_value"]), last

  def consider(self, step: int, valid: dict[str, float], state) -> None:
    if not self.enabled or valid[self.metric] <= self.value:
      return
    self.value, self.step = valid[self.metric], step
    self.ckpt.save(step, state, {**checkpoint_meta(self.program, step),
                                 "selected_on": self.metric, "selected_value": self.value})
    logging.info("new best valid %s %.4f at step %d", self.metric, self.value, step)

  def best(self, current, program: TrainProgram):
    """(step, state) of the best evaluation (restored onto `program`'s layout)."""
    if self.step is None:
      return None, current
    return self.step, restore(self.ckpt, self.step, program)

  def close(self) -> None:
    self.ckpt.close()


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | Path,
                        split: str = "test") -> dict[str, Any]:
  """`split`'s metrics for the newest checkpoint in `workdir`, under `config`'s
  evaluation settings: a finished run re-scored under another protocol (e.g.
  `eval.exclude`) without retraining. Also the most-popular baseline under it."""
  if split not in ("valid", "test"):
    raise ValueError(f"split = {split!r}; valid values are valid, test")
  mesh, dataset, _, program = build(config)
  ckpt = Checkpointer(Path(workdir) / "checkpoints", keep=config.train.keep_checkpoints)
  try:
    state = restore_latest(ckpt, program)
    if state is None:
      raise FileNotFoundError(f"no checkpoint to evaluate in {Path(workdir) / 'checkpoints'}")
    result = _evaluator(config, program, mesh, dataset)(state, split)
  finally:
    ckpt.close()
  baseline = _most_popular(config, dataset, split)
  return {"step": int(jax.device_get(state.step)), split: result,
          f"baseline_most_popular_{split}": baseline, "protocol": protocol(config)}


def _examples(dataset: Dataset, split: str):
  return dataset.valid if split == "valid" else dataset.test


def _most_popular(config, dataset: Dataset, split: str) -> dict[str, float] | None:
  """The most-popular baseline on `split`, under the run's evaluation protocol; None
  unless `eval.baseline` asks for it."""
  if config.eval.baseline != "most_popular":
    return None
  return popularity_metrics(dataset.popularity, _examples(dataset, split),
                            config.eval.exclude, dataset.num_items)


def _evaluator(config, program: TrainProgram, mesh, dataset: Dataset):
  def run(state, split: str) -> dict[str, float]:
    result = evaluate(program.eval_ranks, state.params, mesh, _examples(dataset, split),
                      config.eval.batch_size, config.eval.exclude,
                      with_times=program.fns.uses_time)
    logging.info("%s: HR@10 %.4f NDCG@10 %.4f MRR %.4f (%d users, %.1fs)", split,
                 result["hr@10"], result["ndcg@10"], result["mrr"], result["users"],
                 result["eval_time_s"])
    return result
  return run


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
