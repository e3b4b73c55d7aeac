"""Serves registered rewards over HTTP (the project's JSON protocol; ``rewards/remote.py`` is the client).

  python launch/reward_server.py --port=8000                  # ShapeEval: POST /dense, /strict
  python launch/reward_server.py --port=8000 --serve=dense=shapeeval,mode=dense,canvas=64
  curl localhost:8000/health

Each ``--serve=NAME=KIND[,OPTION=VALUE...]`` serves the reward ``KIND`` of the registry
(``htgrpo_jax/rewards/registry.py``; ``--list`` prints the kinds) at ``POST /NAME``, built with the
options (values read as JSON where they parse). One POST is one batch. A training config points
at it with ``--config.world.reward_url=http://host:8000/dense`` (and ``world.score_url=.../strict``
for evaluation), or with a ``config.rewards`` entry of kind ``remote`` (docs/rewards.md).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 for other hosts).")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0 picks a free one, printed).")
_SERVE = flags.DEFINE_multi_string(
    "serve",
    ["dense=shapeeval,mode=dense", "strict=shapeeval,mode=strict"],
    "NAME=KIND[,OPTION=VALUE...]: serve reward KIND at POST /NAME (repeatable).",
)
_CANVAS = flags.DEFINE_integer(
    "canvas", 32, "ShapeEval canvas (px), where a shapeeval --serve " "entry does not set canvas."
)
_LIST = flags.DEFINE_bool("list", False, "Print the registered reward kinds and exit.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from htgrpo_jax.rewards import registry, server

  if _LIST.value:
    print("\n".join(registry.load_rewards().names()))
    return
  try:
    rewards = server.registered_rewards(_SERVE.value, {"shapeeval": {"canvas": _CANVAS.value}})
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  srv = server.make_server(rewards, _HOST.value, _PORT.value)
  host, port = srv.server_address[:2]
  paths = ", ".join(f"/{n}" for n in rewards)
  print(f"serving rewards on http://{host}:{port} ({paths}, /health)", flush=True)
  try:
    srv.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    srv.server_close()


if __name__ == "__main__":
  app.run(main)
