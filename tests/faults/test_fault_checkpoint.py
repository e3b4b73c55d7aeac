"""Checkpoint faults: a corrupted newest step (bit flip, truncated or missing array file, garbled or
edited JSON items, a garbled manifest) is detected on restore and the previous kept step is used,
with a warning naming the step and the file at fault; a model change is not mistaken for
corruption; keep-N deletion leaves only complete steps."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htgrpo_jax import checkpoint


def _state(v: float):
  """A small TrainState-like pytree: fp32 (random: the bytes do not compress), bf16 and int32."""
  w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32) + v
  return {
      "params": {"w": jnp.asarray(w), "h": jnp.asarray(w[:8], jnp.bfloat16)},
      "step": jnp.asarray(int(v), jnp.int32),
  }


def _abstract():
  return checkpoint.abstract_like(_state(0.0))


def _write(directory, steps=(1, 2), keep=3):
  ck = checkpoint.RunCheckpointer(directory, keep=keep)
  for s in steps:
    ck.save(s, _state(float(s)), {"pos": s * 4}, {"step": s, "history": [{"step": s, "r": 0.1 * s}]})
  ck.close()


def _array_files(step_dir):
  """The array data files of a step, largest first."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return sorted(files, key=os.path.getsize, reverse=True)


def _flip(step_dir):
  path = _array_files(step_dir)[0]
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(data)
  return path


def _truncate(step_dir):
  path = _array_files(step_dir)[0]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _delete(step_dir):  # what a kill during keep-N deletion leaves behind
  path = _array_files(step_dir)[0]
  os.remove(path)
  return path


def _garble(item):
  def fn(step_dir):
    path = os.path.join(step_dir, item, "metadata")
    assert os.path.isfile(path), os.listdir(os.path.join(step_dir, item))
    open(path, "w").write('{"step": 2, "hist')
    return os.path.join(step_dir, item)

  return fn


def _edit_loop(step_dir):  # valid JSON, wrong content
  path = os.path.join(step_dir, "loop", "metadata")
  loop = json.load(open(path))
  loop["history"][0]["r"] = 0.25
  json.dump(loop, open(path, "w"))
  return os.path.join(step_dir, "loop")


CORRUPTIONS = {
    "bit_flip": _flip,
    "truncated_array": _truncate,
    "deleted_array": _delete,
    "garbled_loop_json": _garble("loop"),
    "garbled_data_json": _garble("data"),
    "edited_loop_json": _edit_loop,
    "garbled_manifest": _garble("manifest"),
}


def test_intact_checkpoint_round_trips_exactly_and_carries_a_manifest(tmp_path):
  _write(tmp_path / "ck")
  assert os.path.isdir(tmp_path / "ck" / "2" / "manifest")
  ck = checkpoint.RunCheckpointer(tmp_path / "ck")
  warnings = []
  state, data, loop = ck.restore(_abstract(), warn=warnings.append)
  assert ck.restored_step == 2 and not warnings
  assert data == {"pos": 8} and loop["step"] == 2
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(2.0))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ck.close()


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_step_falls_back_to_previous_with_a_named_warning(tmp_path, kind):
  _write(tmp_path / "ck")
  bad = CORRUPTIONS[kind](str(tmp_path / "ck" / "2"))
  ck = checkpoint.RunCheckpointer(tmp_path / "ck")
  warnings = []
  state, data, loop = ck.restore(_abstract(), warn=warnings.append)
  assert ck.restored_step == 1 and loop["step"] == 1 and data == {"pos": 4}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(1.0))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  text = "\n".join(warnings)
  assert "step 2" in text and "corrupt" in text.lower() and "step 1" in text, text
  # The file (array file or JSON item) or, for a bit flip, the leaf at fault is named.
  named = os.path.dirname(bad) if kind in ("truncated_array", "deleted_array") else bad
  assert os.path.join("2", "state") in text if kind.endswith("array") or kind == "bit_flip" else named in text, text
  if kind == "bit_flip":
    assert "['params']['w']" in text, text
  # The corrupt step is moved aside (kept for inspection), so the next save of step 2 can happen.
  assert ck.latest_step() == 1
  assert glob.glob(os.path.join(str(tmp_path / "ck"), "*", "2*")) or glob.glob(
      str(tmp_path / "ck.corrupt" / "2*")
  ), os.listdir(tmp_path / "ck")
  ck.save(2, _state(2.0), {"pos": 8}, {"step": 2, "history": []})
  ck.close()
  again = checkpoint.RunCheckpointer(tmp_path / "ck")
  assert again.restore(_abstract())[2]["step"] == 2 and again.restored_step == 2
  again.close()


def test_explicit_corrupt_step_raises_naming_it(tmp_path):
  _write(tmp_path / "ck")
  _flip(str(tmp_path / "ck" / "2"))
  ck = checkpoint.RunCheckpointer(tmp_path / "ck")
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"step 2.*\['params'\]\['w'\]"):
    ck.restore(_abstract(), step=2)
  ck.close()


def test_every_kept_step_corrupt_is_an_error_not_a_fresh_start(tmp_path):
  _write(tmp_path / "ck")
  _flip(str(tmp_path / "ck" / "1"))
  _garble("loop")(str(tmp_path / "ck" / "2"))
  ck = checkpoint.RunCheckpointer(tmp_path / "ck")
  with pytest.raises(checkpoint.CorruptCheckpointError, match="step 2.*step 1|no intact"):
    ck.restore(_abstract(), warn=lambda s: None)
  ck.close()


def test_a_different_model_is_a_mismatch_not_corruption(tmp_path):
  _write(tmp_path / "ck")
  other = checkpoint.abstract_like(
      {"params": {"w": jnp.zeros((64, 40)), "h": jnp.zeros((8, 48), jnp.bfloat16)}, "step": jnp.zeros((), jnp.int32)}
  )
  ck = checkpoint.RunCheckpointer(tmp_path / "ck")
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"does not match.*\['params'\]\['w'\]"):
    ck.restore(other, warn=lambda s: None)
  assert ck.latest_step() == 2  # nothing was moved aside
  ck.close()


def test_checksums_do_not_depend_on_the_sharding():
  """The manifest is written on one mesh and verified on another (8 devices -> 1)."""
  mesh = jax.make_mesh((8,), ("d",))
  x = np.random.default_rng(1).standard_normal((16, 24)).astype(np.float32)
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  a = checkpoint.leaf_checksums({"x": sharded})
  b = checkpoint.leaf_checksums({"x": jnp.asarray(x)})
  assert a == b
  y = x.copy()
  y.view(np.uint32)[3, 5] ^= 1  # one bit
  assert checkpoint.leaf_checksums({"x": jnp.asarray(y)}) != b


def test_keep_n_leaves_only_complete_steps(tmp_path):
  _write(tmp_path / "ck", steps=(1, 2, 3, 4), keep=2)
  names = sorted(os.listdir(tmp_path / "ck"))
  assert [n for n in names if n.isdigit()] == ["3", "4"]
  assert not [n for n in names if "tmp" in n], names


def test_a_reader_leaves_in_flight_saves_alone_and_the_writer_cleans_up(tmp_path):
  """What a killed save left (an uncommitted tmp folder, a half-emptied trash) is removed by the
  next writer; a reader (an evaluation next to a live run) never deletes anything."""
  ck = tmp_path / "ck"
  _write(ck, steps=(1,))
  tmp = ck / "2.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_text("half an array")
  (ck / "trash" / "0" / "state").mkdir(parents=True)
  reader = checkpoint.RunCheckpointer(ck)
  assert reader.restore(_abstract())[2]["step"] == 1 and reader.latest_step() == 1
  reader.close()
  assert tmp.exists() and (ck / "trash").exists()
  writer = checkpoint.RunCheckpointer(ck)
  writer.save(2, _state(2.0), {"pos": 8}, {"step": 2})
  writer.close()
  assert not tmp.exists() and not (ck / "trash").exists()
  assert checkpoint.step_dirs(ck) == [1, 2]
