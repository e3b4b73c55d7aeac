"""The remote reward client against a real HTTP server on 127.0.0.1."""

import json

import numpy as np
import pytest

from htgrpo_jax.rewards import remote
from htgrpo_jax.worlds.shapeeval import grammar as G
from htgrpo_jax.worlds.shapeeval import scenes as W
from htgrpo_jax.worlds.shapeeval.verifier import ShapeEvalReward
from tests.helpers import local_server


class _Handler(local_server.Handler):
  """Reference server: decodes the PNGs and scores them with the ShapeEval verifier.

  ``server.script`` is a list of status codes to answer before behaving (to test retries).
  """

  def do_POST(self):  # noqa: N802 (http.server's naming)
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    self.server.requests.append(body)
    if self.server.script:
      code = self.server.script.pop(0)
      return self.reply(code, b"busy" if code != 200 else b"not json")
    imgs = np.stack([remote.decode_png(s) for s in body["images"]])
    self.reply_json({"scores": ShapeEvalReward(mode="dense")(body["prompts"], imgs).tolist()})


@pytest.fixture
def server():
  with local_server.serve(_Handler, requests=[], script=[]) as srv:
    yield srv


def _batch(n=6):
  rng = np.random.default_rng(0)
  ps = G.balanced_prompts("eval", n)
  return [p.text for p in ps], W.render_batch([G.scene_for(p.meta, rng) for p in ps]), ps


def test_png_round_trip_is_lossless():
  img = _batch(1)[1][0]
  np.testing.assert_array_equal(remote.decode_png(remote.encode_png(img)), img)


def test_scores_match_the_local_verifier(server):
  texts, imgs, ps = _batch()
  texts[0] = texts[1]
  url = local_server.url(server, "/score")
  r = remote.RemoteReward(url, name="geneval", metadata_keys=("meta",))
  got = r(texts, imgs, meta=[p.meta for p in ps], ignored=[1] * 6)
  np.testing.assert_array_equal(got, ShapeEvalReward(mode="dense")(texts, imgs))
  assert got.dtype == np.float32 and got[1] == 1.0 and got[0] < 1.0
  sent = server.requests[-1]
  assert set(sent) == {"prompts", "images", "metadata"} and set(sent["metadata"]) == {"meta"}
  assert sent["metadata"]["meta"][0]["tag"] == ps[0].meta.tag


def test_retries_transient_errors_then_succeeds(server):
  texts, imgs, _ = _batch(2)
  server.script[:] = [503, 429]
  url = local_server.url(server, "/")
  out = remote.RemoteReward(url, max_retries=2, backoff=0.01)(texts, imgs)
  assert out.shape == (2,) and len(server.requests) == 3


def test_gives_up_after_bounded_retries(server):
  texts, imgs, _ = _batch(2)
  server.script[:] = [500] * 5
  url = local_server.url(server, "/")
  with pytest.raises(ValueError, match="'geneval'.*after 2 attempts.*HTTP 500"):
    remote.RemoteReward(url, name="geneval", max_retries=1, backoff=0.01)(texts, imgs)
  assert len(server.requests) == 2


def test_client_errors_and_bad_replies_fail_fast(server):
  texts, imgs, _ = _batch(2)
  url = local_server.url(server, "/")
  server.script[:] = [400]
  with pytest.raises(ValueError, match="HTTP 400"):
    remote.RemoteReward(url, max_retries=3, backoff=0.01)(texts, imgs)
  assert len(server.requests) == 1
  server.script[:] = [200]
  with pytest.raises(ValueError, match="not JSON"):
    remote.RemoteReward(url)(texts, imgs)


def test_unreachable_server_and_bad_arguments():
  with pytest.raises(ValueError, match="failed after 2 attempts"):
    remote.RemoteReward("http://127.0.0.1:9/", max_retries=1, backoff=0.01, timeout=1)(
        ["a photo of a circle"], np.zeros((1, 32, 32, 3), np.uint8)
    )
  with pytest.raises(ValueError, match="url"):
    remote.RemoteReward("ftp://x")
  with pytest.raises(ValueError, match="'meta' was not passed"):
    remote.RemoteReward("http://127.0.0.1:9/", metadata_keys=("meta",))(
        ["a photo of a circle"], np.zeros((1, 32, 32, 3), np.uint8)
    )
