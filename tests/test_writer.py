"""What a run writes (``htgrpo_jax.writer``), on a local workdir and on a URL one (``gs://b/run``).

As in ``tests/test_paths.py``, no test touches the network: URL I/O is routed (through
``paths._epath``) onto a local folder that plays the bucket, so the URL code path runs for real.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from htgrpo_jax import evaluate, paths, writer
from tests.helpers.gcs import SEEN


def _res(num_prompts=3, samples=2, seed=0):
  """An ``evaluate.evaluate_policy`` result of ``num_prompts`` x ``samples`` tiny images."""
  rng = np.random.default_rng(seed)
  n = num_prompts * samples
  tags = [("single_object", "two_object", "counting")[i // samples % 3] for i in range(n)]
  strict = (rng.random(n) > 0.5).astype(np.float32)
  return dict(
      images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
      captions=[f"prompt {i // samples}" for i in range(n)],
      tags=tags,
      metas=[json.dumps({"i": i // samples}) for i in range(n)],
      strict=strict,
      prompt_index=np.repeat(np.arange(num_prompts), samples),
      reasons=[""] * n,
      malformed=np.full(n, -1, np.int64),
      scores=evaluate.tag_scores(tags, strict),
  )


@pytest.mark.parametrize("url", [True, False])
def test_eval_reports_round_trip(bucket, tmp_path, url):
  root = "gs://b/run" if url else str(tmp_path / "local" / "run")
  disk = bucket / "b/run" if url else tmp_path / "local" / "run"
  res0, res4 = _res(seed=0), _res(seed=1)
  table = writer.write_eval(root, "step00000", res0, "held-out, base", grid_size=4)
  writer.write_eval(root, "step00004", res4, "held-out, step 4", grid_size=4)
  assert "| **overall**" in table and (disk / "eval_step00000.md").read_text() == table
  assert (disk / "grid_step00004.png").stat().st_size > 0
  assert len(os.listdir(disk / "evals/step00004/images")) == 6
  got = writer.load_eval_samples(root, "step00004")
  np.testing.assert_array_equal(got["strict"], res4["strict"])
  np.testing.assert_array_equal(got["prompt_index"], res4["prompt_index"])
  assert list(got["tags"]) == res4["tags"]
  assert writer.load_eval_samples(root, "step00099") is None

  writer.write_json(paths.join(root, "sub", "eval_step00004.json"), dict(scores=res4["scores"]))
  assert json.loads((disk / "sub/eval_step00004.json").read_text()) == dict(scores=res4["scores"])
  evals = {0: res0["scores"], 4: res4["scores"]}
  md = writer.write_report(
      root, [dict(step=s, reward=0.1 * s) for s in range(1, 5)], evals, curve_title="curve", table_title="held-out"
  )
  assert "| base | step 4 | change |" in md and "[" in md  # paired intervals: the same prompts
  assert (disk / "results.md").read_text() == md
  assert (disk / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
  assert not [p for p in disk.rglob("*.tmp")]
  assert bool(SEEN) == url and all(s.startswith("gs://b/run") for s in SEEN)


def _jsonl(path):
  return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_runlog_on_a_url_buffers_lines_until_a_flush(bucket):
  notes = []
  log = writer.RunLog("gs://b/run", 0, flush_s=3600.0, log=notes.append)
  assert len(notes) == 1 and "gs://b/run/tb" in notes[0]
  jsonl = bucket / "b/run/metrics.jsonl"
  for s in (1, 2, 3):
    log.scalars(s, {"total/loss": 0.5 / s}, dict(prompts=["a"]))
  assert not jsonl.exists()  # not rewritten at every logged step
  log.flush()  # what the trainer does at a save / an evaluation
  assert [r["step"] for r in _jsonl(jsonl)] == [1, 2, 3]
  tb = bucket / "b/run/tb"
  events = [f for f in os.listdir(tb) if f.startswith("events.out.tfevents")]
  assert len(events) == 1 and (tb / events[0]).stat().st_size > 0
  log.scalars(4, {"total/loss": 0.1}, {})
  log.tb_scalars(4, {"eval/overall": 0.3})
  rewrites = lambda: SEEN.count("gs://b/run/metrics.jsonl")
  writes = rewrites()
  log.flush()
  again = rewrites()
  log.flush()  # no new line: metrics.jsonl is not rewritten
  assert rewrites() == again > writes
  assert [r["step"] for r in _jsonl(jsonl)] == [1, 2, 3, 4]
  local = log._tb_local
  log.close()
  assert not os.path.exists(local)  # the local TensorBoard folder is gone, its events copied up
  size = (tb / events[0]).stat().st_size
  assert size > 0 and len(os.listdir(tb)) == 1

  # A resume from step 2 drops the steps it will redo; a flush interval of 0 writes every line.
  log = writer.RunLog("gs://b/run", 2, flush_s=0.0)
  assert [r["step"] for r in _jsonl(jsonl)] == [1, 2]
  log.scalars(3, {"total/loss": 0.2}, {})
  assert [r["step"] for r in _jsonl(jsonl)] == [1, 2, 3]
  log.close()
  assert len([f for f in os.listdir(tb) if f.startswith("events.out.tfevents")]) == 2


def test_runlog_url_upload_failure_is_retried_and_raised_at_close(bucket, monkeypatch):
  log = writer.RunLog("gs://b/run", 0, flush_s=3600.0)
  log.scalars(1, {"x": 1.0}, {})
  real = paths.write_text_atomic
  monkeypatch.setattr(paths, "write_text_atomic", lambda *a: (_ for _ in ()).throw(OSError("503")))
  log.flush()  # logged, kept for the next flush
  assert not (bucket / "b/run/metrics.jsonl").exists()
  local = log._tb_local
  with pytest.raises(OSError, match=f"TensorBoard events are kept in {local}"):
    log.close()
  assert os.path.isdir(local)
  monkeypatch.setattr(paths, "write_text_atomic", real)


def test_runlog_on_a_local_workdir_appends_every_line(bucket, tmp_path):
  wd = tmp_path / "run"
  log = writer.RunLog(str(wd), 0, flush_s=3600.0)
  for s in (1, 2, 3):
    log.scalars(s, {"total/loss": 0.5 / s}, {})
    assert [r["step"] for r in _jsonl(wd / "metrics.jsonl")] == list(range(1, s + 1))
  log.close()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd / "tb"))
  with open(wd / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "total/lo')  # torn by a kill
  writer.RunLog(str(wd), 2).close()
  assert [r["step"] for r in _jsonl(wd / "metrics.jsonl")] == [1, 2]
  assert SEEN == []  # a local workdir never reaches epath
