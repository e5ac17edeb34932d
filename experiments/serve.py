"""Serve a trained run over HTTP: top-k recommendations with request micro-batching.

  python -m experiments.serve --workdir=runs/quickstart --port=8080
  curl -s localhost:8080/recommend -d '{"history": [1, 32, 589], "k": 5}'
  curl -s localhost:8080/recommend -d '{"user": 1, "k": 5}'
  curl -s localhost:8080/healthz

Loads the run's checkpoint (its best one when the run selected on validation) onto
--mesh with the item table --table (replicated | tensor | rows), and its dataset for
the item ids and the known users' histories (jaxrec/serve/http.py).
"""

from __future__ import annotations

import asyncio
import json

from absl import app, flags, logging

from experiments import runtime, serving_flags

_PORT = flags.DEFINE_integer("port", 8080, "Port on localhost.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "Requests per device batch at most.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 5.0, "Wait for more requests this long.")


def main(argv):
  del argv
  runtime.setup()
  from aiohttp import web

  from jaxrec.serve.http import Catalogue, ServeOptions, make_app

  servable, dataset = serving_flags.load()
  catalogue = Catalogue.from_dataset(dataset)
  options = ServeOptions(max_batch=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT_MS.value)
  programs = servable.warm_up(options.max_batch, servable.max_len)
  logging.info("compiled %d recommend programs (batch buckets up to %d requests)", programs,
               options.max_batch)
  logging.info("serving step %d of %s on %s (table %s), %d items, %d known users",
               servable.step, serving_flags.WORKDIR.value, serving_flags.MESH.value,
               serving_flags.TABLE.value, servable.num_items,
               len(catalogue.histories))

  async def serve() -> None:
    runner = web.AppRunner(make_app(servable, catalogue, options))
    await runner.setup()
    try:
      await web.TCPSite(runner, _HOST.value, _PORT.value).start()
      # printed once the socket accepts connections (scripts wait for this line)
      print(json.dumps({"listening": f"http://{_HOST.value}:{_PORT.value}",
                        "step": servable.step}), flush=True)
      await asyncio.Event().wait()
    finally:
      await runner.cleanup()

  try:
    asyncio.run(serve())
  except KeyboardInterrupt:
    logging.info("stopped")


if __name__ == "__main__":
  app.run(main)
