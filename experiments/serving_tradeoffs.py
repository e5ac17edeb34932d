"""What a parallel layout buys and costs when serving: latency, throughput, memory, bytes.

  python -m experiments.serving_tradeoffs --workdir=runs/quickstart --out=out/serving

For each inference layout on 8 (fake CPU) devices — the item table replicated with
requests split over data replicas (data:8); the table split over tensor with the layers
(data:4,tensor:2); the table split over rows (data:8 and data:4,tensor:2) — it runs the HTTP
endpoint on localhost and a bounded load test (a fixed number of requests, a fixed
concurrency) at several micro-batch sizes, and reports:

  p50 / p99 ms   request latency seen by the client
  req/s          completed requests per second
  MiB/device     params per device + the compiled step's temporaries
  B/request      bytes the compiled recommend step moves between devices per request
                 (HLO accounting, ring model)

the latency of one more item through the KV cache against a full recompute (one
device, the longest test history), and the cost model's prediction of one batch's latency and the table's memory per
device for H100 and TPU v5p at 1M and 100M items (predicted, not measured). Without
--workdir the params are freshly initialised (latency does not depend on training).
Prints a table, writes OUT/serving_tradeoffs.json and a plot.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from absl import app, flags

from experiments import runtime

_WORKDIR = flags.DEFINE_string("workdir", "", "A trained run (default: fresh params).")
_OUT = flags.DEFINE_string("out", "out/serving_tradeoffs", "Output folder.")
_REQUESTS = flags.DEFINE_integer("requests", 200, "Requests per load test.")
_BATCHES = flags.DEFINE_list("max_batch", ["1", "8", "32"], "Micro-batch sizes to test.")
# tensor stays at 2: the quickstart model has 2 heads, and tensor must divide them.
LAYOUTS = (("data:8", "replicated"), ("data:4,tensor:2", "tensor"), ("data:8", "rows"),
           ("data:4,tensor:2", "rows"))


def load_test(servable, catalogue, max_batch: int, requests: int, history):
  import logging
  from aiohttp.test_utils import TestClient, TestServer
  import numpy as np
  from jaxrec.serve.http import ServeOptions, make_app

  app = make_app(servable, catalogue, ServeOptions(max_batch=max_batch, max_wait_ms=2.0))
  logging.getLogger("aiohttp.access").setLevel(logging.WARNING)   # one line per request
  servable.warm_up(max_batch, len(history))   # every bucket the load test can hit
  latencies = []

  async def one(client, sem):
    async with sem:
      start = time.perf_counter()
      resp = await client.post("/recommend", json={"history": history, "k": 10})
      await resp.json()
      latencies.append(time.perf_counter() - start)

  async def run():
    async with TestClient(TestServer(app)) as client:
      await one(client, asyncio.Semaphore(1))          # warm-up: compile the bucket
      latencies.clear()
      sem = asyncio.Semaphore(2 * max_batch)
      start = time.perf_counter()
      await asyncio.gather(*[one(client, sem) for _ in range(requests)])
      return time.perf_counter() - start

  wall = asyncio.run(run())
  ms = np.asarray(latencies) * 1e3
  return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
          "req_per_s": requests / wall}


def incremental_latency(servable, history: list[int], repeats: int) -> dict:
  """One more item through the KV cache vs a full recompute of the longer history
  (one device, median ms of the hidden state; scoring the catalogue is the same for
  both and left out)."""
  from jaxrec.serve.incremental import Incremental
  from jaxrec.timing import median_seconds

  inc = Incremental(servable.fns, servable.params)
  session = inc.start(history[:-1])
  full = median_seconds(lambda: inc.start(history).hidden, lambda: (), repeats)
  step = median_seconds(lambda: inc.append(session, history[-1]).hidden, lambda: (), repeats)
  return {"history_len": len(history), "full_recompute_ms": full * 1e3,
          "kv_cache_append_ms": step * 1e3}


def hlo_row(servable, max_batch: int):
  from jaxrec.perf import hlo
  rows = max_batch * servable.data_size
  compiled = servable.lowered(rows, servable.max_len).compile()
  report = hlo.analyze(compiled, servable.program.mesh)
  wire = sum(report["wire_bytes_by_axis"].values())
  return {"bytes_per_request": wire * servable.program.mesh.size / rows,
          "temp_mib": report["memory"].get("temp_size_in_bytes", 0) / 2 ** 20}


def predictions(d_model: int, n_layers: int, seq: int, batch: int = 32):
  """Cost-model latency of one batch and table memory per device, per layout."""
  from jaxrec import hardware
  out = []
  for hw in (hardware.H100, hardware.TPU_V5P):
    for items in (1_000_000, 100_000_000):
      for mesh, table in LAYOUTS:
        sizes = dict(p.split(":") for p in mesh.split(","))
        d, t = int(sizes.get("data", 1)), int(sizes.get("tensor", 1))
        shards = {"replicated": 1, "tensor": t, "rows": d * t}[table]
        per_device = batch / d if table != "rows" else batch   # rows: gathered over data
        table_bytes = items * d_model * 2 / shards            # bf16 table
        layer_flops = 2 * (4 * d_model ** 2 + 2 * d_model * 4 * d_model) * seq * n_layers
        flops = per_device * (layer_flops / t + 2 * d_model * items / shards)
        compute = flops / (hw.peak_flops * 0.5) + table_bytes / (hw.hbm_bandwidth * 0.8)
        comm_bytes = 0.0
        if t > 1:   # layer all-reduces and the top-k candidates' gather
          comm_bytes += per_device * (2 * n_layers * seq * d_model * 2 + 10 * 8 * t)
        if table == "rows":
          comm_bytes += batch * d_model * 4
        comm = comm_bytes / (hw.fast_bandwidth * 0.8) + (2 * n_layers + 2) * hw.fast_latency * (t > 1)
        out.append({"hardware": hw.name, "items": items, "mesh": mesh, "table": table,
                    "batch": batch, "predicted_batch_ms": 1e3 * (compute + comm),
                    "table_gib_per_device": table_bytes / 2 ** 30,
                    "fits": table_bytes < hw.hbm_bytes * 0.8, "source": "cost model"})
  return out


def main(argv):
  del argv
  runtime.setup(cpu_devices=8)
  import jax
  from experiments.configs import quickstart
  from jaxrec.data import load_dataset
  from jaxrec.serve.http import Catalogue
  from jaxrec.serve.servable import Servable

  small = runtime.small()
  config = runtime.run_config(quickstart.get_config())
  dataset = load_dataset(config.data)
  catalogue = Catalogue.from_dataset(dataset)
  history = [int(dataset.item_ids[i]) for i in dataset.test.history_of(0)[-20:]]
  rows = []
  batches = [1, 8] if small else [int(b) for b in _BATCHES.value]
  requests = 16 if small else _REQUESTS.value
  for mesh, table in LAYOUTS:
    with runtime.user_errors():
      servable = (Servable.load(_WORKDIR.value, mesh, table) if _WORKDIR.value
                  else Servable.from_init(config, dataset.num_items, mesh, table))
    for b in batches:
      row = {"mesh": mesh, "table": table, "max_batch": b,
             "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
             "param_mib_per_device": servable.param_bytes_per_device() / 2 ** 20}
      row.update(hlo_row(servable, b))
      row.update(load_test(servable, catalogue, b, requests, history))
      rows.append(row)
      print(f"{mesh:<17}{table:<11}batch {b:>3}  p50 {row['p50_ms']:7.1f} ms  p99 "
            f"{row['p99_ms']:7.1f} ms  {row['req_per_s']:7.1f} req/s  "
            f"{row['param_mib_per_device'] + row['temp_mib']:7.2f} MiB/device  "
            f"{row['bytes_per_request']:9.0f} B/request", flush=True)
  one = jax.devices()[:1]
  with runtime.user_errors():
    single = (Servable.load(_WORKDIR.value, "data:1", "replicated", devices=one)
              if _WORKDIR.value else
              Servable.from_init(config, dataset.num_items, "data:1", "replicated", devices=one))
  longest = max(range(len(dataset.test)), key=lambda r: len(dataset.test.history_of(r)))
  incremental = incremental_latency(
      single, [int(i) for i in dataset.test.history_of(longest)[-config.data.max_len:]],
      repeats=5 if small else 50)
  print(f"\nincremental inference, history of {incremental['history_len']} items, 1 device: "
        f"full recompute {incremental['full_recompute_ms']:.2f} ms, KV-cache append "
        f"{incremental['kv_cache_append_ms']:.2f} ms")
  predicted = predictions(config.model.d_model, config.model.n_layers, config.data.max_len)
  print("\npredicted (cost model, bf16 table, batch 32):")
  for p in predicted:
    print(f"{p['hardware']:<8}{p['items']:>11,} items  {p['mesh']:<17}{p['table']:<11}"
          f"{p['predicted_batch_ms']:9.3f} ms  {p['table_gib_per_device']:8.2f} GiB/device"
          f"{'' if p['fits'] else '  (does not fit)'}")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "serving_tradeoffs.json").write_text(json.dumps(
      {"measured": rows, "incremental": incremental, "predicted": predicted,
       "note": "measured on faked CPU devices on one host (latency includes the Python "
               "HTTP stack); predictions are cost-model outputs"}, indent=2))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for mesh, table in LAYOUTS:
    pts = [r for r in rows if r["mesh"] == mesh and r["table"] == table]
    ax.plot([r["req_per_s"] for r in pts], [r["p99_ms"] for r in pts], "o-",
            label=f"{mesh} ({table})")
    for r in pts:
      ax.annotate(str(r["max_batch"]), (r["req_per_s"], r["p99_ms"]), fontsize=7)
  ax.set_xlabel("requests / s")
  ax.set_ylabel("p99 latency (ms)")
  ax.set_title("serving layouts on 8 CPU devices (labels: micro-batch size)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "serving_tradeoffs.png", dpi=110)
  print(f"wrote {out / 'serving_tradeoffs.json'} and serving_tradeoffs.png")


if __name__ == "__main__":
  app.run(main)
