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
  imgs = W.render_batch([G.scene_for(p.meta, rng) for p in ps[:6]] +
                        [G.scene_for(p.meta, rng) for p in ps[:6]])  # 6 right, 6 wrong scenes
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
