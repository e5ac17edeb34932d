"""The published quality table, reproduced: ours next to the paper's, row by row.

  python -m experiments.reproduce --dataset=ml1m --root=runs/reproduce --out=out/reproduce
  python -m experiments.reproduce --dataset=amazon-video

Each row trains its config (full ranking over the catalogue, the user's history
removed, leave-one-out test split, the checkpoint selected on validation NDCG@10 by
the loop's `train.select_on`) in ROOT/DATASET/ROW; a row whose workdir already holds
a finished run (summary.json) is read back instead of retrained, and an unfinished
one resumes from its checkpoint. Prints ours vs published with the wall time and the
device, writes OUT/reproduce_DATASET.json and a plot of validation NDCG@10 vs step.

On ML-1M the candidates exclude the items of the model's input window (the last
`max_len`), as generative-recommenders' eval.py does for the published table, not the
user's whole history (SASRec's protocol, `eval.exclude = "history"`, the configs'
default); `--exclude` picks another, and a finished run scored another way is
re-scored from its last checkpoint rather than retrained.

`--holdout=test` runs the rows under the published runs' own split instead
(generative-recommenders trains through each user's second-to-last item and evaluates
the last one during training, with no validation split): workdirs ROOT/DATASET-test/ROW,
nothing selected, the last step reported, and the curve is test NDCG@10.

On a CPU host add `--cpu_devices=8`: the rows then run on data:8 (which the tests show
equals one device), faster on a 2-core machine than one CPU device because XLA's CPU
backend gives each faked device its own thread: ~2.4x for the SASRec row, but only
~1.1x for HSTU-large (0.40 against 0.36 steps/s over 72 steps, identical losses; why
it gains less was not measured).

Published figures: Zhai et al. 2024, "Actions Speak Louder than Words" (HSTU),
Table 2, MovieLens-1M, full ranking: SASRec (sampled softmax, 128 negatives), HSTU,
HSTU-large. The Amazon file is SASRec's `data/Video.txt` (the "Games" dataset of its
paper: Amazon Video Games, 5-core; 31,013 users, 23,715 items, 287,107 actions); the
papers that use it report sampled (101-candidate) metrics, which are not comparable, so
no row has a published target. The nearest published full-ranking figures on an Amazon
category (Books, generative-recommenders' README) are printed beside the table as
context: another catalogue, not a target.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from experiments import runtime

ROWS = {
    # dataset: [(row, config file, published {"hr@10", "ndcg@10"} or None)]
    "ml1m": [
        ("sasrec", "experiments/configs/ml1m.py", {"hr@10": 0.2853, "ndcg@10": 0.1603}),
        ("sasrec_sampled", "experiments/configs/ml1m_sampled.py",
         {"hr@10": 0.2853, "ndcg@10": 0.1603}),
        ("hstu", "experiments/configs/ml1m_hstu.py", {"hr@10": 0.3097, "ndcg@10": 0.1720}),
        ("hstu_large", "experiments/configs/ml1m_hstu_large.py",
         {"hr@10": 0.3294, "ndcg@10": 0.1893}),
    ],
    "amazon-video": [
        ("sasrec", "experiments/configs/amazon.py", None),
        ("hstu", "experiments/configs/amazon_hstu.py", None),
    ],
}
METRICS = ("hr@10", "ndcg@10", "mrr")   # what each row reports
SOURCE = "Zhai et al. 2024 (HSTU), Table 2: ML-1M, full ranking, HR@10 / NDCG@10"
CONTEXT = {   # published full-ranking figures on a related dataset: shown, never compared
    "amazon-video": "Amazon Books (another category and catalogue; generative-recommenders "
                    "README, verified 04/15/2024), full ranking, HR@10 / NDCG@10: SASRec "
                    ".0306 / .0164, HSTU .0416 / .0227, HSTU-large .0478 / .0262",
}

_DATASET = flags.DEFINE_enum("dataset", "ml1m", sorted(ROWS), "Which table.")
_ROWS = flags.DEFINE_list("rows", [], "Rows to run (default: all of the dataset's).")
_ROOT = flags.DEFINE_string("root", "runs/reproduce", "Workdirs: ROOT/DATASET/ROW.")
_OUT = flags.DEFINE_string("out", "out/reproduce", "Output folder.")
_SEEDS = flags.DEFINE_list(
    "seeds", ["0"], "Seed offsets: each row runs once per seed s (config.seed and "
    "data.shuffle_seed + s; workdir ROW for s = 0, ROW-seedS otherwise); several seeds "
    "add each row's mean and sample std.")
# The published table's candidate exclusion: generative-recommenders' eval.py removes
# the items of the model's input window (its padded past_ids, the last 200), not the
# whole history; 26% of ML-1M's users have more than 200 items before the test item.
TABLE_EXCLUSION = {"ml1m": "input"}
_EXCLUDE = flags.DEFINE_enum(
    "exclude", "", ["", "history", "input", "none"],
    "Which of a user's items leave the candidates (eval.exclude): history (all of them, "
    "SASRec's protocol), input (only the model's input window, generative-recommenders') "
    "or none; '' = the table's own (TABLE_EXCLUSION: input for ml1m), else each config's. "
    "A finished run scored otherwise is re-scored from its last checkpoint "
    "(ROW/test_exclude_EXCLUDE.json).")
_DATA_PATH = flags.DEFINE_string(
    "data_path", "",
    "Every row's data.path instead of its config's: e.g. ML-1M's ratings.dat, whose "
    "timestamps turn the HSTU rows' time bias on (ml-1m.txt has none). Give such runs "
    "their own --root: a finished run that read another file is refused, not read back.")
_HOLDOUT = flags.DEFINE_enum(
    "holdout", "valid_test", ["valid_test", "test"],
    "valid_test: our protocol (validation item held out, checkpoint selected on it); "
    "test: the published runs' split (trained through the validation item, last step).")


def scored_exclusion(summary: dict) -> str:
  """The `eval.exclude` a finished run's test metrics were computed under (an older
  summary's `exclude_history` / `exclude_scope` read as `saved_config` reads them)."""
  from jaxrec.config import saved_config
  return saved_config(summary.get("config", {})).eval.exclude


def rescore(name: str, path: str, workdir: Path, holdout: str, seed: int, exclude: str,
            summary: dict, data_path: str = "") -> dict:
  """A finished run's test metrics under `eval.exclude = exclude`, from its last
  checkpoint (computed once, then read back)."""
  cache = workdir / f"test_exclude_{exclude}.json"
  if cache.exists():
    return json.loads(cache.read_text())
  if summary.get("selected"):
    raise SystemExit(f"{name}: its test metrics are of the checkpoint selected on "
                     "validation, not its last one; re-scoring covers --holdout=test runs")
  from jaxrec.train.loop import evaluate_checkpoint
  out = evaluate_checkpoint(row_config(path, holdout, seed, exclude, data_path), workdir)
  if out["step"] != summary["steps"]:
    raise SystemExit(f"{name}: the last checkpoint in {workdir} is step {out['step']}, "
                     f"not the run's final step {summary['steps']}")
  cache.write_text(json.dumps(out, indent=2))
  return out


def seed_workdir(root: Path, name: str, seed: int) -> Path:
  """Seed 0 keeps the row's own workdir, so runs made before seeds existed are read back."""
  return root / (name if seed == 0 else f"{name}-seed{seed}")


def row_config(path: str, holdout: str, seed: int = 0, exclude: str = "",
               data_path: str = ""):
  """The config a row runs: its file's, on `holdout`, offset by `seed`, reading
  `data_path` if given."""
  config = runtime.run_config(runtime.load_config(path))
  if data_path:
    config.data.path = data_path
  config.seed += seed               # initialisation, dropout and sampled negatives
  config.data.shuffle_seed += seed  # batch order
  if holdout != config.data.holdout:
    config.data.holdout = holdout
    config.train.select_on = ""     # there is no validation split to select on
  if exclude:
    config.eval.exclude = exclude
  return config


def same_file(a: str, b: str) -> bool:
  """Two data.path values name the same file ("" is the embedded dataset)."""
  return a == b or bool(a and b and Path(a).resolve() == Path(b).resolve())


def run_row(name: str, path: str, workdir: Path, holdout: str, seed: int = 0,
            exclude: str = "", data_path: str = "") -> dict:
  """The row's summary: read back if the run finished (on the same data file), else
  trained (or resumed)."""
  done = workdir / "summary.json"
  if done.exists():
    summary = json.loads(done.read_text())
    read = summary.get("config", {}).get("data", {}).get("path")
    if read is not None:   # a summary records the file it read
      wanted = data_path or row_config(path, holdout, seed).data.path
      if not same_file(read, wanted):
        raise SystemExit(f"{name}: the finished run in {workdir} read {read}, not "
                         f"{wanted}; give runs on another data file their own --root")
    logging.info("%s: finished run found in %s", name, workdir)
    return summary
  from jaxrec.train.loop import train_and_evaluate
  config = row_config(path, holdout, seed, exclude, data_path)
  summary = train_and_evaluate(config, str(workdir))
  if summary is None:
    raise SystemExit(f"{name}: stopped before the end; rerun to resume from {workdir}")
  return summary


def curve(workdir: Path, split: str) -> list[tuple[int, float]]:
  """NDCG@10 of the periodic evaluations on `split` (a selected step's re-evaluation
  is not part of the curve)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  points = []
  for line in path.read_text().splitlines():
    record = json.loads(line)
    if record.get("split") == split and not record.get("selected"):
      points.append((record["step"], record["ndcg@10"]))
  return points


def parse_seeds(values: list[str]) -> list[int]:
  """--seeds as distinct non-negative ints, in the order given."""
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise SystemExit(f"--seeds={','.join(values)}: give non-negative integers, e.g. 0,1,2")
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise SystemExit(f"--seeds={','.join(values)}: give distinct non-negative integers, "
                     "e.g. 0,1,2")
  return seeds


def seed_summaries(results: list[dict]) -> list[dict]:
  """Per row: mean and sample standard deviation (n - 1) of test HR@10 / NDCG@10 over
  its seeds, so a gap to the published figure can be read against the seed spread."""
  out = []
  for row in dict.fromkeys(r["row"] for r in results):
    runs = [r for r in results if r["row"] == row]
    entry = {"row": row, "seeds": [r["seed"] for r in runs], "published": runs[0]["published"]}
    for metric in ("hr@10", "ndcg@10"):
      values = np.array([r["test"][metric] for r in runs])
      entry[f"{metric}_mean"] = float(values.mean())
      entry[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out.append(entry)
  return out


def main(argv):
  del argv
  runtime.setup()
  dataset = _DATASET.value
  rows = [r for r in ROWS[dataset] if not _ROWS.value or r[0] in _ROWS.value]
  unknown = set(_ROWS.value) - {r[0] for r in ROWS[dataset]}
  if unknown:
    raise SystemExit(f"--rows {sorted(unknown)} not in {[r[0] for r in ROWS[dataset]]}")
  holdout = _HOLDOUT.value
  root = Path(_ROOT.value) / (dataset if holdout == "valid_test" else f"{dataset}-{holdout}")
  split = "valid" if holdout == "valid_test" else "test"
  seeds = parse_seeds(_SEEDS.value)
  wanted = _EXCLUDE.value or TABLE_EXCLUSION.get(dataset, "")
  results = []
  for name, path, published in rows:
    for seed in seeds:
      workdir = seed_workdir(root, name, seed)
      start = time.perf_counter()
      with runtime.user_errors():
        summary = run_row(name, path, workdir, holdout, seed, wanted, _DATA_PATH.value)
        trained = scored_exclusion(summary)
        exclude = wanted or trained
        rescored = (rescore(name, path, workdir, holdout, seed, exclude, summary,
                            _DATA_PATH.value) if exclude != trained else None)
      test = (rescored or summary)["test"]
      selected = summary.get("selected") or {}
      total_wall = summary.get("total_wall_s")   # absent / None: written before it existed
      results.append({
          "row": name, "seed": seed, "config": path, "workdir": str(workdir),
          "test": {k: test[k] for k in METRICS},
          "exclude": exclude,
          "test_as_trained": ({k: summary["test"][k] for k in METRICS}
                              if rescored else None),
          "published": published, "published_source": SOURCE if published else None,
          "selected_step": selected.get("step"), "steps": summary["steps"],
          # every segment's wall; an older summary has only its last segment's
          "wall_time_s": summary["wall_time_s"] if total_wall is None else total_wall,
          "wall_from_step": ((summary.get("resumed_from_step") or 0) if total_wall is None
                             else 0),
          "device": summary["device"], "data_source": summary.get("data_source"),
          "mesh": summary["mesh"], "protocol": (rescored or summary)["protocol"],
          "this_call_s": time.perf_counter() - start,
          "holdout": holdout, "curve_split": split,
          "curve_exclude": trained,   # as trained (and logged)
          "ndcg10_by_step": curve(workdir, split)})
  chosen = ("checkpoint selected on validation NDCG@10" if holdout == "valid_test" else
            "trained through the validation item, last step (the published runs' split)")
  exclusions = sorted({r["exclude"] for r in results})
  removed = {"history": "history removed", "input": "the input window's items removed",
             "none": "history kept"}
  print(f"\n{dataset}: test split, full ranking, "
        f"{' / '.join(removed[e] for e in exclusions)}, {chosen}")
  print(f"{'row':<16}{'seed':>5}{'HR@10':>8}{'NDCG@10':>9}{'pub HR':>8}{'pub NDCG':>9}"
        f"{'NDCG/pub':>9}{'sel step':>10}{'wall':>9}  device")
  for r in results:
    pub = r["published"] or {}
    ratio = (f"{r['test']['ndcg@10'] / pub['ndcg@10']:.3f}" if pub else "-")
    print(f"{r['row']:<16}{r['seed']:>5}{r['test']['hr@10']:>8.4f}"
          f"{r['test']['ndcg@10']:>9.4f}{pub.get('hr@10', float('nan')):>8.4f}"
          f"{pub.get('ndcg@10', float('nan')):>9.4f}{ratio:>9}{str(r['selected_step']):>10}"
          f"{r['wall_time_s'] / 60:>8.1f}m{'*' if r['wall_from_step'] else ' '} "
          f"{r['device']} ({r['mesh']})")
  summaries = seed_summaries(results) if len(seeds) > 1 else []
  for s in summaries:
    pub = s["published"] or {}
    ratio = f"{s['ndcg@10_mean'] / pub['ndcg@10']:.3f}" if pub else "-"
    print(f"{s['row']:<16}{'mean':>5}{s['hr@10_mean']:>8.4f}{s['ndcg@10_mean']:>9.4f}"
          f"{pub.get('hr@10', float('nan')):>8.4f}{pub.get('ndcg@10', float('nan')):>9.4f}"
          f"{ratio:>9}  std HR {s['hr@10_std']:.4f} NDCG {s['ndcg@10_std']:.4f} "
          f"over seeds {s['seeds']}")
  print("data: " + "; ".join(sorted({r["data_source"] or "?" for r in results})))
  if dataset in CONTEXT:
    print(f"context (not a target): {CONTEXT[dataset]}")
  for r in results:
    if r["wall_from_step"]:
      print(f"* {r['row']} seed {r['seed']}: wall of the last segment only "
            f"(resumed at step {r['wall_from_step']})")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  name = f"reproduce_{dataset}" + ("" if holdout == "valid_test" else f"_{holdout}")
  (out / f"{name}.json").write_text(json.dumps(
      {"dataset": dataset, "rows": results, "seed_summaries": summaries,
       "context": CONTEXT.get(dataset),
       "small": runtime.small()}, indent=2))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  # a curve is scored as its run was trained; say so where the curves differ
  mixed = len({r["curve_exclude"] for r in results if r["ndcg10_by_step"]}) > 1
  for r in results:
    if r["ndcg10_by_step"]:
      steps, values = zip(*r["ndcg10_by_step"])
      label = r["row"] if len(seeds) == 1 else f"{r['row']} seed {r['seed']}"
      if mixed:
        label += f" (exclude={r['curve_exclude']})"
      ax.plot(steps, values, "o-", ms=3, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel(f"{split} NDCG@10")
  ax.set_title(f"{dataset}: {split} NDCG@10 (full ranking)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / f"{name}.png", dpi=110)
  print(f"wrote {out / f'{name}.json'} and {name}.png")


if __name__ == "__main__":
  app.run(main)
