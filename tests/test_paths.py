"""Every path may be a URL: ``gs://bucket/run`` is never turned into ``<cwd>/gs:/bucket/run``.

No test touches the network: URL I/O is routed (through ``paths._epath``) onto a local folder that
plays the bucket, so the URL code path runs for real while the bytes land under ``tmp_path``.
"""

from __future__ import annotations

import json
import os

import jax
import pytest

from htgrpo_jax import checkpoint, evaluate_run, paths, tasks, trainer, workdir
from htgrpo_jax.worlds.shapeeval import codebook as patch_vq
from htgrpo_jax.worlds.shapeeval import task as shapes_task
from tests.helpers.configs import tiny_config

from tests.helpers.gcs import SEEN


@pytest.mark.parametrize("url", ["gs://b/run", "gs://b/run/checkpoints/", "s3://b/x", "file:///tmp/x"])
def test_resolve_keeps_urls(url):
  assert paths.is_url(url)
  assert paths.resolve(url) == url
  assert paths.join(url.rstrip("/"), "params") == url.rstrip("/") + "/params"


def test_resolve_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert not paths.is_url("runs/x") and not paths.is_url("/abs/gs://x")
  assert paths.resolve("runs/x") == os.path.join(str(tmp_path), "runs", "x")
  assert paths.resolve(tmp_path / "y") == str(tmp_path / "y")


def test_local_helpers_are_the_plain_file_system(tmp_path, monkeypatch):
  monkeypatch.setattr(paths, "_epath", lambda p: pytest.fail(f"local path {p} reached epath"))
  d = paths.join(str(tmp_path), "a", "b")
  paths.makedirs(d)
  assert paths.isdir(d) and not paths.isfile(d)
  f = paths.join(d, "x.txt")
  paths.write_text_atomic(f, "one\n")
  paths.append_text(f, "two\n")
  with paths.open(f, encoding="utf-8") as fh:
    assert fh.read() == "one\ntwo\n"
  assert not os.path.exists(f + ".tmp")
  assert paths.listdir(d) == ["x.txt"] and paths.exists(f) and paths.isfile(f)
  paths.rename(f, paths.join(d, "y.txt"))
  assert paths.listdir(d) == ["y.txt"]
  assert paths.local_copy(d) == d
  paths.rmtree(paths.join(str(tmp_path), "a"))
  assert not paths.exists(d)


def test_url_helpers_go_through_epath(bucket):
  paths.makedirs("gs://b/run/sub")
  assert (bucket / "b/run/sub").is_dir() and paths.isdir("gs://b/run/sub")
  paths.write_text_atomic("gs://b/run/sub/x.txt", "one\n")
  paths.append_text("gs://b/run/sub/x.txt", "two\n")  # object stores cannot append: rewritten
  assert (bucket / "b/run/sub/x.txt").read_text() == "one\ntwo\n"
  assert paths.listdir("gs://b/run/sub") == ["x.txt"] and paths.isfile("gs://b/run/sub/x.txt")
  with paths.open("gs://b/run/sub/x.txt", "rb") as f:
    assert f.read() == b"one\ntwo\n"
  local = paths.local_copy("gs://b/run", cache_dir=str(bucket.parent / "cache"))
  assert not paths.is_url(local) and open(os.path.join(local, "sub", "x.txt")).read() == "one\ntwo\n"
  assert paths.local_copy("gs://b/run", cache_dir=str(bucket.parent / "cache")) == local  # reused
  paths.rename("gs://b/run/sub/x.txt", "gs://b/run/sub/y.txt")
  assert paths.listdir("gs://b/run/sub") == ["y.txt"]
  paths.rmtree("gs://b/run")
  assert not paths.exists("gs://b/run")


def test_no_gs_folder_appears_under_the_working_directory(bucket, tmp_path):
  cwd = tmp_path / "cwd"  # the bucket fixture's empty working directory
  workdir.WorkdirLock("gs://b/run", log=lambda m: None).acquire()  # creates the folder, as locally
  changes = workdir.check_config("gs://b/run", json.dumps({"seed": 0}), resuming=False, allow=False)
  assert changes == {}
  assert json.loads((bucket / "b/run/config.json").read_text()) == {"seed": 0}
  workdir.check_config("gs://b/run", json.dumps({"seed": 0}), resuming=True, allow=False)
  hist = (bucket / "b/run/config_history.jsonl").read_text().splitlines()
  assert [json.loads(h)["start"] for h in hist] == [0, 1]
  with pytest.raises(workdir.ConfigChangedError, match="seed"):
    workdir.check_config("gs://b/run", json.dumps({"seed": 1}), resuming=True, allow=False)
  assert os.listdir(cwd) == []  # nothing like ./gs:/b/run


def test_workdir_lock_skips_a_url_workdir_and_says_so(bucket, tmp_path):
  notes = []
  lock = workdir.WorkdirLock("gs://b/run", log=notes.append)
  assert lock.workdir == "gs://b/run" and lock.path == "gs://b/run/.lock"
  with lock:
    assert not lock.locked
    # a second run on the same URL is not refused: there is no lock to refuse it with
    with workdir.WorkdirLock("gs://b/run", log=notes.append) as other:
      assert not other.locked
  assert len(notes) == 2 and "gs://b/run is not on a local file system" in notes[0]
  assert "NOT locked" in notes[0]
  assert not (bucket / "b/run/.lock").exists()  # nothing was written for the lock

  with workdir.WorkdirLock(str(tmp_path / "local"), log=notes.append) as local:  # local still locks
    assert local.locked
    with pytest.raises(workdir.WorkdirLockedError):
      workdir.WorkdirLock(str(tmp_path / "local")).acquire()
  assert len(notes) == 2


def test_checkpointer_keeps_a_url_directory(bucket, monkeypatch):
  made = {}

  class FakeManager:

    def __init__(self, directory, options=None):
      made["directory"] = directory

  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", FakeManager)
  ckpt = checkpoint.RunCheckpointer("gs://b/run/checkpoints", keep=2, async_save=False)
  assert ckpt.directory == made["directory"] == "gs://b/run/checkpoints"
  assert ckpt.corrupt_dir == "gs://b/run/checkpoints/corrupt"
  assert ckpt._step_dir(7) == "gs://b/run/checkpoints/7"
  for name in ("3", "12", "5.orbax-checkpoint-tmp-1", "trash"):
    (bucket / "b/run/checkpoints" / name).mkdir(parents=True)
  assert checkpoint.step_dirs("gs://b/run/checkpoints") == [3, 12]
  ckpt._clean_uncommitted()
  assert sorted(os.listdir(bucket / "b/run/checkpoints")) == ["12", "3"]
  assert checkpoint.step_dirs("gs://b/missing") == []


def test_task_paths_keep_urls(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = shapes_task.pretrain_config.__globals__["ml_collections"].ConfigDict({"model": {"checkpoint": "gs://b/base"}})
  assert shapes_task.base_params_path(c) == "gs://b/base/params"
  c.model.checkpoint = "runs/base"
  assert shapes_task.base_params_path(c) == os.path.join(str(tmp_path), "runs", "base", "params")

  (bucket / "b").mkdir()
  (bucket / "b/prompts.jsonl").write_text(
      '{"prompt": "a red circle", "tag": "single_object"}\n\n' '{"prompt": "two squares"}\n'
  )
  got = tasks.read_prompt_file("gs://b/prompts.jsonl", "world.train_prompts")
  assert [(p.text, p.tag) for p in got] == [("a red circle", "single_object"), ("two squares", "all")]
  with pytest.raises(ValueError, match=r"world.eval_prompts: prompt file 'gs://b/nope.jsonl' does not exist"):
    tasks.read_prompt_file("gs://b/nope.jsonl", "world.eval_prompts")


def test_world_codebook_round_trips_through_a_url(bucket):
  import jax.numpy as jnp

  cb = jnp.arange(2 * 48, dtype=jnp.float32).reshape(2, 48)  # K = 2 codes of 4 x 4 x 3 patches
  paths.makedirs("gs://b/world")
  patch_vq.save("gs://b/world/codebook.npz", cb)
  assert (bucket / "b/world/codebook.npz").is_file()
  assert (patch_vq.load("gs://b/world/codebook.npz") == cb).all()


def test_trainer_keeps_a_url_workdir(bucket, tmp_path, monkeypatch):
  """``train`` on ``gs://b/run``: the workdir reaches the loop as written, the lock is skipped with
  a note in the run's own log, config.json and its history land in the bucket, and nothing
  appears under the working directory. (The loop itself is replaced: its files go through the
  writer, tested on a URL in tests/test_writer.py, and Orbax.)"""
  cwd = tmp_path / "cwd"  # the bucket fixture's empty working directory
  seen = {}

  def loop(config, p, mesh, wd, control, *, log, stop_after):
    seen["workdir"] = wd
    assert control.lock is not None and not control.lock.locked
    return dict(workdir=wd)

  monkeypatch.setattr(trainer, "_train", loop)
  cfg = tiny_config(tmp_path, "unused")
  cfg.workdir = "gs://b/run"
  lines = []
  out = trainer.train(cfg, log=lines.append)
  assert out["workdir"] == seen["workdir"] == "gs://b/run"
  assert any("gs://b/run is not on a local file system" in ln and "NOT locked" in ln for ln in lines)
  assert json.loads((bucket / "b/run/config.json").read_text())["workdir"] == "gs://b/run"
  assert len((bucket / "b/run/config_history.jsonl").read_text().splitlines()) == 1
  assert os.listdir(cwd) == []
  assert all(p.startswith("gs://b/run") for p in SEEN)
  # Evaluating a URL workdir's checkpoint names the URL (no checkpoint in this one).
  with pytest.raises(ValueError, match="no run checkpoint under gs://b/run/checkpoints;"):
    evaluate_run.restore_params("gs://b/run/checkpoints", None)


# Where os.path.abspath may stand: on the package's own files, in ``paths.resolve`` itself, and on
# the compilation cache dir (which ``runtime.set_compilation_cache`` passes only when it has no
# scheme). Anywhere else it would turn a gs:// config value into ``<cwd>/gs:/...``.
ABSPATH_ALLOWED = {("paths.py", "resolve"), ("runtime.py", "set_compilation_cache")}


def test_no_module_makes_a_path_absolute_but_paths_resolve():
  import ast

  root = os.path.dirname(os.path.dirname(os.path.abspath(paths.__file__)))
  bad = []
  for folder, _, files in os.walk(os.path.join(root, "htgrpo_jax")):
    for name in files:
      if not name.endswith(".py"):
        continue
      file = os.path.join(folder, name)
      tree = ast.parse(open(file, encoding="utf-8").read())
      owner = {}  # each call -> the innermost function it is in
      for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
          for node in ast.walk(fn):
            owner[node] = fn.name  # an inner function's walk comes later and wins
      for call in ast.walk(tree):
        if not (
            isinstance(call, ast.Call)
            and ast.unparse(call.func) in ("os.path.abspath", "os.path.realpath", "pathlib.Path.resolve")
        ):
          continue
        arg = ast.unparse(call.args[0]) if call.args else ""
        if "__file__" in arg or (name, owner.get(call, "<module>")) in ABSPATH_ALLOWED:
          continue
        bad.append(f"{os.path.relpath(file, root)}:{call.lineno} {ast.unparse(call)}")
  assert not bad, f"use paths.resolve (keeps gs:// URLs): {sorted(set(bad))}"


def test_converted_params_save_and_restore_keep_a_url(tmp_path, monkeypatch):
  """``convert.save_params`` / ``restore_params`` (launch/convert_checkpoint.py's --out_dir, the
  t2i world's model.checkpoint) hand Orbax the URL as written: Orbax reads and writes gs://
  itself (through TensorStore, which no local folder can stand in for: the directory Orbax is
  given is routed to ``tmp_path`` at its door)."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from htgrpo_jax.models import convert

  seen = []
  real = ocp.Checkpointer

  def route(directory):
    seen.append(os.fspath(directory))
    assert "gs:/" not in seen[-1] or seen[-1].startswith("gs://"), f"mangled: {seen[-1]}"
    return tmp_path / seen[-1].replace("://", "_")

  class Routed(real):

    def save(self, directory, *a, **k):
      return super().save(route(directory), *a, **k)

    def restore(self, directory, *a, **k):
      return super().restore(route(directory), *a, **k)

  monkeypatch.setattr(ocp, "Checkpointer", Routed)
  monkeypatch.chdir(tmp_path)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  convert.save_params(params, "gs://b/base")
  got = convert.restore_params("gs://b/base", {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
  assert seen == ["gs://b/base", "gs://b/base"]
  assert (got["w"] == params["w"]).all()
  convert.save_params(params, "local_base")  # a local path is still made absolute
  assert seen[-1] == str(tmp_path / "local_base")


def test_reward_model_dirs_may_be_urls(bucket, tmp_path, monkeypatch):
  """The on-device reward models' checkpoint and tokenizer options (clipscore, geneval_owl) take
  gs:// dirs: their readers get a local copy; a missing one is named by its option."""
  import tempfile
  from htgrpo_jax.rewards import clip as clip_reward

  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # local_copy's cache: this test's
  for d in ("clip", "tok"):
    (bucket / "b" / d).mkdir(parents=True)
    (bucket / "b" / d / "config.json").write_text(f'{{"dir": "{d}"}}')
  local = clip_reward.local_path("gs://b/clip", "rewards.clipscore.checkpoint")
  assert not paths.is_url(local) and json.load(open(os.path.join(local, "config.json"))) == {"dir": "clip"}
  with pytest.raises(ValueError, match=r"rewards\.clipscore\.checkpoint='gs://b/none': no such file"):
    clip_reward.local_path("gs://b/none", "rewards.clipscore.checkpoint")
  seen = {}
  monkeypatch.setattr(clip_reward, "load_clip", lambda ckpt, tok, **kw: seen.update(ckpt=ckpt, tok=tok))
  clip_reward.load_clip_options("gs://b/clip", "gs://b/tok", "hf", "", None)
  assert json.load(open(os.path.join(seen["ckpt"], "config.json"))) == {"dir": "clip"}
  assert json.load(open(os.path.join(seen["tok"], "config.json"))) == {"dir": "tok"}
