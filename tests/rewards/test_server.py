"""The reward server: the project's own client scores through it exactly as the local reward does."""

import json
import threading
import urllib.request

import numpy as np
import pytest

from htgrpo_jax.rewards import server
from htgrpo_jax.rewards.remote import RemoteReward, RemoteRewardError
from htgrpo_jax.worlds.shapeeval import grammar as G
from htgrpo_jax.worlds.shapeeval import scenes as W


@pytest.fixture
def served():
  rewards = server.shapeeval_rewards()
  srv = server.make_server(rewards)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{srv.server_address[1]}", rewards
  srv.shutdown()
  srv.server_close()


def test_remote_scores_equal_local_scores_and_health_counts_batches(served):
  url, local = served
  rng = np.random.default_rng(0)
  ps = G.balanced_prompts("eval", 12, seed=1)
  imgs = W.render_batch(
      [G.scene_for(p.meta, rng) for p in ps[:6]] + [G.scene_for(p.meta, rng) for p in ps[:6]]
  )  # 6 right, 6 wrong scenes
  texts, metas = [p.text for p in ps], [p.meta.to_json() for p in ps]
  for mode in ("dense", "strict"):
    remote = RemoteReward(f"{url}/{mode}", name=mode, metadata_keys=("meta",))
    np.testing.assert_array_equal(remote(texts, imgs, meta=metas), local[mode](texts, imgs, meta=metas))
  health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())
  assert health["requests"] == {"dense": 1, "strict": 1} and health["images"]["strict"] == 12


def test_bad_requests_and_reward_failures_are_named(served):
  url, _ = served
  remote = RemoteReward(f"{url}/strict", name="strict", max_retries=0)  # the prompt is parsed
  img = W.render_batch([W.Scene(())])
  with pytest.raises(RemoteRewardError, match="unknown word"):  # the verifier's own error
    remote(["a photo of a dodecahedron"], img)
  with pytest.raises(RemoteRewardError, match="404"):
    RemoteReward(f"{url}/nope", name="nope", max_retries=0)(["a photo of a circle"], img)


def test_registered_rewards_are_built_by_name_and_options_are_named():
  served = server.registered_rewards(["d=shapeeval,mode=dense,canvas=32", "s=shapeeval,mode=strict"])
  assert set(served) == {"d", "s"} and served["d"].mode == "dense" and served["s"].mode == "strict"
  assert server.parse_serve_spec("c=clipscore,scale=2.5,path=/x,on=true") == (
      "c",
      "clipscore",
      {"scale": 2.5, "path": "/x", "on": True},
  )
  with pytest.raises(ValueError, match="must be one of"):
    server.registered_rewards(["x=no_such_reward"])
  with pytest.raises(ValueError, match=r"--serve x\.colour: not an option of reward kind 'shapeeval'"):
    server.registered_rewards(["x=shapeeval,colour=red"])
  with pytest.raises(ValueError, match=r"--serve r\.url: required"):
    server.registered_rewards(["r=remote"])
  with pytest.raises(ValueError, match="served twice"):
    server.registered_rewards(["x=shapeeval", "x=shapeeval"])
  with pytest.raises(ValueError, match="NAME=KIND"):
    server.parse_serve_spec("shapeeval")


def test_launch_script_serves_the_registry_on_a_port():
  """The real launch/reward_server.py process: health, then one batch through the JSON client."""
  import os
  import re
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.Popen(
      [
          sys.executable,
          os.path.join(repo, "launch/reward_server.py"),
          "--port=0",
          "--serve=dense=shapeeval,mode=dense",
          "--serve=gt=shapeeval,mode=strict",
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  try:
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert m, line + proc.stdout.read() if proc.poll() is not None else line
    url = f"http://127.0.0.1:{m.group(1)}"
    health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
    assert health["status"] == "ok" and health["rewards"] == ["dense", "gt"]
    rng = np.random.default_rng(0)
    ps = G.balanced_prompts("eval", 6, seed=2)
    imgs = W.render_batch([G.scene_for(p.meta, rng) for p in ps])
    got = RemoteReward(f"{url}/gt", name="gt", metadata_keys=("meta",))(
        [p.text for p in ps], imgs, meta=[p.meta.to_json() for p in ps]
    )
    np.testing.assert_array_equal(got, np.ones(6, np.float32))  # ground-truth scenes pass
    health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
    assert health["requests"] == {"dense": 0, "gt": 1} and health["images"]["gt"] == 6
  finally:
    proc.terminate()
    proc.wait(timeout=30)
