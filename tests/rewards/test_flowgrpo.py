"""The Flow-GRPO GenEval reward-server client: its pickle protocol against a real local server
written here the way ``yifan123/reward-server``'s ``app_geneval.py`` answers, and the restricted
unpickler that reads the replies (nothing a malicious pickle asks for runs)."""

import copyreg
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from htgrpo_jax.rewards import flowgrpo
from htgrpo_jax.rewards.flowgrpo import FlowGRPOGenEval, UnsafePickleError, loads_plain
from htgrpo_jax.rewards.registry import build_reward
from htgrpo_jax.rewards.remote import RemoteRewardError
from tests.helpers import local_server

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class _Touch:
  """A pickle payload that would create ``path`` when unpickled by ``pickle.loads``."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def _fake_scores(image: np.ndarray, meta: dict) -> tuple[float, float, float]:
  """What the fake server scores: (dense, GenEval 0/1, strict 0/1) from the pixels it decoded."""
  dense = float(image.mean() / 255.0)
  return dense, float(dense > 0.5), float(dense > 0.6 and meta["tag"] != "counting")


class _FlowGRPOHandler(local_server.Handler):
  """Answers like app_geneval.py: pickle in, pickle out; 500 with a traceback text on failure.

  ``server.reply`` (when set) replaces the pickled answer with these bytes (malicious replies).
  """

  def do_POST(self):  # noqa: N802
    raw = self.rfile.read(int(self.headers["Content-Length"]))
    self.server.content_types.append(self.headers["Content-Type"])
    if self.server.reply is not None:
      return self.reply(200, self.server.reply)
    data = loads_plain(raw)  # our own request must be plain data too
    self.server.requests.append(data)
    images = [np.asarray(Image.open(io.BytesIO(d), formats=["jpeg"]).convert("RGB")) for d in data["images"]]
    scores, rewards, strict = [], [], []
    groups, gstrict = {t: [] for t in TAGS}, {t: [] for t in TAGS}
    for im, meta in zip(images, data["meta_datas"]):
      d, c, s = _fake_scores(im, meta)
      scores.append(d)
      rewards.append(0.0 if data["only_strict"] else c)
      strict.append(s)
      for t in TAGS:
        groups[t].append(rewards[-1] if t == meta["tag"] else -10.0)
        gstrict[t].append(s if t == meta["tag"] else -10.0)
    self.reply(
        200,
        pickle.dumps(
            {
                "scores": scores,
                "rewards": rewards,
                "strict_rewards": strict,
                "group_rewards": groups,
                "group_strict_rewards": gstrict,
            }
        ),
    )


@pytest.fixture
def fake():
  with local_server.serve(_FlowGRPOHandler, requests=[], content_types=[], reply=None) as srv:
    yield srv, local_server.url(srv)


def _batch(n=5, seed=0):
  rng = np.random.default_rng(seed)
  # Flat colours: JPEG keeps their means within a grey level, far from the fake's thresholds.
  levels = rng.choice([20, 90, 140, 170, 230], size=n)
  images = np.broadcast_to(levels[:, None, None, None], (n, 32, 32, 3)).astype(np.uint8).copy()
  metas = [
      json.dumps(
          {"tag": TAGS[i % 6], "include": [{"class": "cat", "count": 1 + i % 3}], "prompt": f"a photo of cat {i}"}
      )
      for i in range(n)
  ]
  return [f"a photo of cat {i}" for i in range(n)], images, metas


def test_scores_come_back_in_order_and_the_request_is_flowgrpos(fake):
  srv, url = fake
  prompts, images, metas = _batch()
  got = FlowGRPOGenEval(url, name="geneval")(prompts, images, meta=metas)
  sent = srv.requests[-1]
  assert set(sent) == {"images", "meta_datas", "only_strict"} and sent["only_strict"] is True
  assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in sent["images"])  # JPEG
  assert sent["meta_datas"] == [json.loads(m) for m in metas]
  assert srv.content_types[-1] == "application/octet-stream"
  decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in sent["images"]]
  want = np.array([_fake_scores(im, json.loads(m))[0] for im, m in zip(decoded, metas)], np.float32)
  assert got.dtype == np.float32 and got.shape == (5,)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got, images.mean(axis=(1, 2, 3)) / 255.0, atol=2 / 255)

  strict = FlowGRPOGenEval(url, field="strict_rewards")(prompts, images, meta=metas)
  np.testing.assert_array_equal(strict, [_fake_scores(im, json.loads(m))[2] for im, m in zip(decoded, metas)])
  geneval = build_reward("flowgrpo_geneval", dict(url=url, field="rewards", only_strict=False), "rewards.g")
  np.testing.assert_array_equal(
      geneval(prompts, images, meta=metas), [_fake_scores(im, json.loads(m))[1] for im, m in zip(decoded, metas)]
  )
  assert srv.requests[-1]["only_strict"] is False


def test_restricted_unpickler_runs_nothing(tmp_path):
  target = tmp_path / "pwned"
  evil = pickle.dumps({"scores": [0.5], "x": _Touch(target)})
  for protocol in (0, 2, 4, 5):
    with pytest.raises(UnsafePickleError, match=r"global (posix|os|nt)\.system; refused"):
      loads_plain(pickle.dumps(_Touch(target), protocol=protocol))
  with pytest.raises(UnsafePickleError, match="system"):
    loads_plain(evil)
  # The extension registry (EXT opcodes) resolves through find_class too.
  copyreg.add_extension("os", "system", 0x7A11)
  try:
    with pytest.raises(UnsafePickleError, match="system"):
      loads_plain(pickle.dumps(_Touch(target), protocol=2))
  finally:
    copyreg.remove_extension("os", "system", 0x7A11)
  with pytest.raises(UnsafePickleError, match="builtins.eval"):
    loads_plain(b"cbuiltins\neval\n(S'1'\ntR.")
  with pytest.raises(UnsafePickleError, match="persistent id"):
    loads_plain(b"P0\n.")
  with pytest.raises(UnsafePickleError, match="set"):  # no global needed, still not plain data
    loads_plain(pickle.dumps({"scores": {1.0, 2.0}}, protocol=4))
  with pytest.raises(UnsafePickleError, match="numpy"):  # numpy scalars are globals
    loads_plain(pickle.dumps([np.float64(0.5)]))
  with pytest.raises(pickle.UnpicklingError, match="malformed|truncated|ran out"):
    loads_plain(pickle.dumps({"scores": [0.5]})[:-3])
  assert not target.exists()
  plain = {"scores": [0.5, 1, -2.0], "t": (b"\x00", None, True, "s"), "n": {"k": [[]]}}
  assert loads_plain(pickle.dumps(plain)) == plain


def test_malicious_or_malformed_replies_fail_naming_the_reward(fake, tmp_path):
  srv, url = fake
  prompts, images, metas = _batch(3)
  r = FlowGRPOGenEval(url, name="geneval", max_retries=0)
  target = tmp_path / "pwned"

  def reply(obj, match):
    srv.reply = obj if isinstance(obj, bytes) else pickle.dumps(obj)
    with pytest.raises(RemoteRewardError, match=match) as e:
      r(prompts, images, meta=metas)
    assert "'geneval'" in str(e.value) and url in str(e.value)

  reply({"scores": [0.1, 0.2, _Touch(target)]}, "refused.*system")
  assert not target.exists()
  reply({"scores": [0.1, 0.2]}, r"'scores' must be a list of 3 numbers.*got 2 entries")
  reply({"scores": [0.1, float("nan"), 0.3]}, r"'scores' has non-finite values at \[1\]")
  reply({"scores": [0.1, True, 0.3]}, r"'scores'\[1\] is True, not a number")
  reply({"scores": [0.1, "0.2", 0.3]}, r"'scores'\[1\] is '0.2'")
  reply({"scores": [0.1, 0.2, 0.3], "strict_rewards": [1.0, float("inf"), 0.0]}, "'strict_rewards'")
  reply({"rewards": [0.0] * 3}, "no 'scores' field")
  reply([0.1, 0.2, 0.3], "must be a dict")
  reply(b"not a pickle", "reply refused: malformed")
  srv.reply = None


def test_bad_settings_and_metadata_are_named(fake):
  _, url = fake
  prompts, images, metas = _batch(2)
  with pytest.raises(ValueError, match="needs only_strict=False"):
    FlowGRPOGenEval(url, field="rewards")
  with pytest.raises(ValueError, match="field='dense' must be one of"):
    FlowGRPOGenEval(url, field="dense")
  with pytest.raises(ValueError, match=r"metadata 'meta'\[1\] must be a GenEval record"):
    FlowGRPOGenEval(url)(prompts, images, meta=[metas[0], json.dumps({"prompt": "x"})])
  with pytest.raises(ValueError, match="metadata key 'meta' was not passed"):
    FlowGRPOGenEval(url)(prompts, images)


def test_jpeg_is_what_the_server_decodes():
  img = np.full((16, 16, 3), 128, np.uint8)
  back = np.asarray(Image.open(io.BytesIO(flowgrpo.encode_jpeg(img)), formats=["jpeg"]))
  assert back.shape == (16, 16, 3) and abs(int(back.mean()) - 128) <= 1


def test_the_t2i_world_speaks_flowgrpo_when_configured(fake):
  """``world.reward_protocol='flowgrpo'``: RL asks for the dense ``scores``, evaluation for
  GenEval's own 0/1 ``rewards`` (with only_strict=False), both from the configured server."""
  from htgrpo_jax import tasks

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c = tasks.load_config_file(os.path.join(repo, "configs", "mmada_geneval.py"))
  srv, url = fake
  c.world.reward_url, c.world.reward_protocol = url, "flowgrpo"
  reward, strict = tasks.remote_rewards(c)
  assert isinstance(reward, FlowGRPOGenEval) and (reward.field, reward.only_strict) == ("scores", True)
  assert isinstance(strict, FlowGRPOGenEval) and (strict.field, strict.only_strict) == ("rewards", False)
  prompts, images, metas = _batch(4)
  np.testing.assert_array_equal(reward(prompts, images, meta=metas), FlowGRPOGenEval(url)(prompts, images, meta=metas))
  assert reward.timeout == c.world.reward_timeout
  c.world.reward_protocol = "grpc"
  with pytest.raises(ValueError, match=r"world\.reward_protocol='grpc'"):
    tasks.remote_rewards(c)
