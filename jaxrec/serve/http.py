"""The online endpoint: JSON over HTTP (aiohttp), requests micro-batched onto the mesh.

  POST /recommend   {"history": [item ids, oldest first], "k": 10}  or  {"user": id, "k": 10}
                    -> {"items": [...], "scores": [...]}   (original item ids)
  GET  /healthz     -> {"status": "ok", "step": ..., "items": ..., "compiled": ...}

Why aiohttp: an asyncio server lets one process hold many open requests while a
single batcher task gathers them (up to `max_batch`, or `max_wait_ms` after the
first) into one `recommend` call on the devices — the micro-batching that makes an
accelerator worth serving from — with a maintained HTTP/1.1 implementation, JSON
helpers and a test client, none of which we want to write by hand.

Bad requests get a 400 naming the field and what would be valid: malformed JSON,
unknown item ids, an empty or over-long history, k out of range, an unknown user.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import numpy as np
from aiohttp import web

from jaxrec.serve.servable import Servable


@dataclasses.dataclass(frozen=True)
class Catalogue:
  """Original ids <-> internal ids, and the known users' histories (internal ids)."""
  item_ids: np.ndarray                 # original id per internal id (index 0 unused)
  histories: dict[int, np.ndarray]     # original user id -> internal item ids

  def internal(self) -> dict[int, int]:
    return {int(orig): i for i, orig in enumerate(self.item_ids) if i > 0}

  @classmethod
  def from_dataset(cls, dataset) -> "Catalogue":
    """Every evaluated user's whole sequence (the test history and the test item)."""
    test = dataset.test
    histories = {int(dataset.user_ids[u]): np.append(test.history_of(r), test.target[r])
                 for r, u in enumerate(test.users)}
    return cls(np.asarray(dataset.item_ids), histories)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
  max_batch: int = 32
  max_wait_ms: float = 5.0
  max_k: int = 100
  max_history: int = 10_000


class BadRequest(ValueError):
  pass


BATCHER = web.AppKey("batcher", object)   # the app's Batcher (tests read its batch sizes)


class Batcher:
  """Collects requests into batches: up to max_batch, or max_wait_ms after the first."""

  def __init__(self, servable: Servable, options: ServeOptions):
    self.servable, self.options = servable, options
    self.queue: asyncio.Queue = asyncio.Queue()
    self.batches: list[int] = []    # sizes of the batches run (for tests and stats)
    self._task: asyncio.Task | None = None

  async def start(self, app: web.Application) -> None:
    del app
    self._task = asyncio.get_running_loop().create_task(self._run())

  async def stop(self, app: web.Application) -> None:
    del app
    if self._task:
      self._task.cancel()

  async def submit(self, history: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    future = asyncio.get_running_loop().create_future()
    await self.queue.put((history, k, future))
    return await future

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = [await self.queue.get()]
      deadline = time.monotonic() + self.options.max_wait_ms / 1000
      while len(batch) < self.options.max_batch:
        left = deadline - time.monotonic()
        if left <= 0:
          break
        try:
          batch.append(await asyncio.wait_for(self.queue.get(), left))
        except asyncio.TimeoutError:
          break
      k = max(item[1] for item in batch)
      self.batches.append(len(batch))
      try:
        recs = await loop.run_in_executor(
            None, lambda: self.servable.recommend([b[0] for b in batch], k))
        for row, (_, want, future) in enumerate(batch):
          if not future.done():
            future.set_result((recs.ids[row, :want], recs.scores[row, :want]))
      except Exception as e:  # noqa: BLE001  (every waiting request gets the error)
        for _, _, future in batch:
          if not future.done():
            future.set_exception(e)


def make_app(servable: Servable, catalogue: Catalogue,
             options: ServeOptions = ServeOptions()) -> web.Application:
  internal = catalogue.internal()
  batcher = Batcher(servable, options)

  def parse(body: Any) -> tuple[np.ndarray, int]:
    if not isinstance(body, dict):
      raise BadRequest("the request body must be a JSON object with 'history' or 'user'")
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= options.max_k:
      raise BadRequest(f"field 'k' = {k!r}: must be an integer in 1..{options.max_k}")
    if "history" in body:
      history = body["history"]
      if not isinstance(history, list) or not all(
          isinstance(i, int) and not isinstance(i, bool) for i in history):
        raise BadRequest("field 'history' must be a list of item ids (integers)")
      if not history:
        raise BadRequest("field 'history' is empty: give at least one item id")
      if len(history) > options.max_history:
        raise BadRequest(f"field 'history' has {len(history)} items; at most "
                         f"{options.max_history} are accepted")
      unknown = [i for i in history if i not in internal]
      if unknown:
        raise BadRequest(f"field 'history' has unknown item ids {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
      return np.asarray([internal[i] for i in history], np.int32), k
    if "user" in body:
      user = body["user"]
      if isinstance(user, bool) or not isinstance(user, int) or user not in catalogue.histories:
        raise BadRequest(f"field 'user' = {user!r} is not a known user id")
      return catalogue.histories[user], k
    raise BadRequest("give field 'history' (a list of item ids) or field 'user' (a user id)")

  async def recommend(request: web.Request) -> web.Response:
    try:
      body = json.loads(await request.text())
    except json.JSONDecodeError as e:
      return web.json_response({"error": f"malformed JSON: {e}"}, status=400)
    try:
      history, k = parse(body)
    except BadRequest as e:
      return web.json_response({"error": str(e)}, status=400)
    ids, scores = await batcher.submit(history, k)
    return web.json_response({"items": [int(catalogue.item_ids[i]) for i in ids],
                              "scores": [float(s) for s in scores]})

  async def healthz(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok", "step": servable.step,
                              "items": servable.num_items,
                              "compiled": servable.compiled_programs(),
                              "batches": len(batcher.batches)})

  app = web.Application()
  app.add_routes([web.post("/recommend", recommend), web.get("/healthz", healthz)])
  app.on_startup.append(batcher.start)
  app.on_cleanup.append(batcher.stop)
  app[BATCHER] = batcher
  return app
