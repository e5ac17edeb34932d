"""Serving: checkpoints -> top-k on any inference layout, batch inference, the KV
cache, the HTTP endpoint."""

import asyncio
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from jaxrec.data import load_dataset
from jaxrec.serve.http import BATCHER, Catalogue, ServeOptions, make_app
from jaxrec.serve.incremental import Incremental
from jaxrec.serve.servable import Servable
from jaxrec.train.loop import train_and_evaluate
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A small trained run (embedded MovieLens, 60 steps) with its checkpoint."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(**{"train.steps": 60, "train.lr": 5e-3, "train.batch_size": 32,
                          "model.d_model": 32, "train.log_every": 0, "train.eval_every": 0,
                          "train.checkpoint_every": 0, "eval.batch_size": 64,
                          "data.max_len": 16, "mesh": "data:8", "model.dropout": 0.0,
                          "eval.baseline": "none"})
  summary = train_and_evaluate(config, workdir)
  return workdir, config, summary


@pytest.fixture(scope="module")
def reference(run):
  return Servable.load(run[0], "data:1", "replicated", devices=jax.devices()[:1])


def histories(run, n=20):
  data = load_dataset(run[1].data)
  return [data.test.history_of(r) for r in range(n)]


@pytest.mark.parametrize("mesh, table", [("data:4", "replicated"),
                                         ("data:2,tensor:2", "tensor"),
                                         ("data:2,tensor:4", "rows")])
def test_every_inference_layout_recommends_the_same(run, reference, mesh, table):
  devices = int(np.prod([int(p.split(":")[1]) for p in mesh.split(",")]))
  servable = Servable.load(run[0], mesh, table, devices=jax.devices()[:devices])
  hist = histories(run)
  want = reference.recommend(hist, k=10)
  got = servable.recommend(hist, k=10)
  np.testing.assert_array_equal(got.ids, want.ids)
  np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
  assert all(len(set(r)) == 10 for r in got.ids.tolist())
  for row, h in zip(got.ids, hist):                 # seen items are not recommended
    assert not set(row.tolist()) & set(h.tolist())


def test_buckets_keep_the_compiled_programs_few(run, reference):
  data = load_dataset(run[1].data)
  rng = np.random.default_rng(0)
  before = reference.compiled_programs()
  for _ in range(12):
    n = int(rng.integers(1, 30))
    rows = rng.choice(len(data.test), n)
    reference.recommend([data.test.history_of(r)[:int(rng.integers(1, 40))] for r in rows],
                        k=int(rng.integers(1, 20)))
  assert reference.compiled_programs() - before <= 8


def test_warm_up_compiles_every_bucket_a_micro_batch_can_hit(run):
  servable = Servable.load(run[0], "data:2", "replicated", devices=jax.devices()[:2])
  compiled = servable.warm_up(max_batch=20, history_length=12)
  assert compiled == 3                     # 1..2 -> 1 row/device, 3..16 -> 8, 17..20 -> 32
  hist = [list(range(1, 13))]
  for n in range(1, 21):
    servable.recommend(hist * n, k=10)
  assert servable.compiled_programs() == compiled


def test_batch_inference_reproduces_the_runs_test_hr_at_1(run, tmp_path):
  out = tmp_path / "recs.jsonl"
  result = subprocess.run([sys.executable, "-m", "experiments.recommend",
                           f"--workdir={run[0]}", "--k=5", f"--output={out}"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["users"] == run[2]["test"]["users"] and run[2]["test"]["hr@1"] > 0
  assert report["top1_is_test_item"] == pytest.approx(run[2]["test"]["hr@1"], abs=1e-12)
  lines = out.read_text().splitlines()
  assert len(lines) == report["users"] and len(json.loads(lines[0])["items"]) == 5


def test_one_more_item_through_the_kv_cache_equals_a_full_recompute(run, reference):
  inc = Incremental(reference.fns, reference.params)
  history = [int(i) for i in histories(run, 1)[0][:9]]
  session = inc.start(history)
  grown = inc.append(session, 42)
  full = inc.start(history + [42])
  np.testing.assert_allclose(grown.hidden, full.hidden, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(inc.scores(grown), inc.scores(full), rtol=1e-5, atol=1e-4)
  # and the cached prefill equals the model's own forward
  ctx = reference.fns.context()
  params = jax.device_get(reference.params)
  want = reference.fns.last_hidden(params, np.asarray([history + [42]], np.int32), ctx)[0]
  np.testing.assert_allclose(full.hidden, want, rtol=1e-5, atol=1e-5)


def test_http_endpoint_answers_batches_and_refuses_bad_requests(run, reference):
  data = load_dataset(run[1].data)
  catalogue = Catalogue.from_dataset(data)
  app = make_app(reference, catalogue, ServeOptions(max_batch=8, max_wait_ms=50))
  user = next(iter(catalogue.histories))
  history = [int(data.item_ids[i]) for i in catalogue.histories[user][:5]]

  async def scenario():
    async with TestClient(TestServer(app)) as client:
      assert (await (await client.get("/healthz")).json())["status"] == "ok"
      resp = await client.post("/recommend", json={"history": history, "k": 5})
      assert resp.status == 200
      body = await resp.json()
      internal = catalogue.internal()
      want = reference.recommend([np.asarray([internal[i] for i in history])], k=5)
      assert body["items"] == [int(data.item_ids[i]) for i in want.ids[0]]
      by_user = await (await client.post("/recommend", json={"user": user, "k": 3})).json()
      want = reference.recommend([catalogue.histories[user]], k=3)
      assert by_user["items"] == [int(data.item_ids[i]) for i in want.ids[0]]
      # micro-batching: 16 concurrent requests run in fewer calls
      before = len(app[BATCHER].batches)
      answers = await asyncio.gather(*[client.post("/recommend",
                                                   json={"history": history, "k": 4})
                                       for _ in range(16)])
      assert all(a.status == 200 for a in answers)
      assert len(app[BATCHER].batches) - before < 16
      bad = {
          "not json": ("/recommend", "{oops", "malformed JSON"),
          "unknown": ("/recommend", {"history": [10 ** 9]}, "unknown item ids [1000000000]"),
          "empty": ("/recommend", {"history": []}, "field 'history' is empty"),
          "long": ("/recommend", {"history": history * 5000}, "at most 10000"),
          "k": ("/recommend", {"history": history, "k": 0}, "field 'k' = 0"),
          "user": ("/recommend", {"user": -5}, "field 'user' = -5"),
          "none": ("/recommend", {"x": 1}, "give field 'history'"),
      }
      for name, (path, payload, needle) in bad.items():
        kwargs = {"data": payload} if isinstance(payload, str) else {"json": payload}
        resp = await client.post(path, **kwargs)
        assert resp.status == 400, name
        assert needle in (await resp.json())["error"], name

  asyncio.run(scenario())
