"""Serves rewards over HTTP (the project's JSON protocol; ``rewards/remote.py`` is the client).

  python launch/reward_server.py --port=8000                  # ShapeEval: POST /dense, /strict
  curl localhost:8000/health

A training config points at it with ``--config.world.reward_url=http://host:8000/dense`` (and
``world.score_url=.../strict`` for evaluation).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 for other hosts).")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0 picks a free one, printed).")
_CANVAS = flags.DEFINE_integer("canvas", 32, "ShapeEval canvas (px).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from htgrpo_jax.rewards import server
  srv = server.make_server(server.shapeeval_rewards(canvas=_CANVAS.value), _HOST.value, _PORT.value)
  host, port = srv.server_address[:2]
  print(f"serving ShapeEval rewards on http://{host}:{port} (/dense, /strict, /health)", flush=True)
  try:
    srv.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    srv.server_close()


if __name__ == "__main__":
  app.run(main)
