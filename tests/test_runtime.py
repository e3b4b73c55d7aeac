"""htgrpo_jax/runtime.py: the persistent compilation cache (written, then hit by a second process,
even when the process compiled something before setup), the per-process log level and the filter
of the libraries' info chatter, and the entry points that call it."""

import logging as std_logging
import os
import subprocess
import sys

import pytest
from absl import logging

from htgrpo_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CACHE_SCRIPT = r"""
import os, sys
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
jnp.sin(jnp.ones(3)).block_until_ready()   # something compiled before the setup
from htgrpo_jax import runtime
rt = runtime.setup_runtime({"compilation_cache_dir": sys.argv[1], "log_level": "warning"})
f = jax.jit(lambda x: jnp.tanh(x @ x.T + 3.0).sum())
f(jnp.ones((17, 5))).block_until_ready()
print("RESULT", rt.process_index, rt.process_count, rt.log_level, rt.compilation_cache_dir, len(hits))
# A second setup in the same process (a notebook rerun, the next run of a study) moves the cache.
runtime.setup_runtime({"compilation_cache_dir": sys.argv[2], "log_level": "warning"})
g = jax.jit(lambda x: jnp.cos(x * 7.0 - 1.0).sum())
g(jnp.ones((3, 11))).block_until_ready()
print("SECOND", sorted(os.listdir(sys.argv[2])))
"""


def _run_cache_script(cache, other):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=REPO)
  out = subprocess.run(
      [sys.executable, "-c", _CACHE_SCRIPT, cache, other], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
  second = [ln for ln in out.stdout.splitlines() if ln.startswith("SECOND")][-1]
  return line.split()[1:], second


def test_compilation_cache_is_written_then_hit_by_a_second_process(tmp_path):
  cache = tmp_path / "nested" / "cache"  # created by setup_runtime
  (index, count, level, path, hits), second = _run_cache_script(str(cache), str(tmp_path / "b1"))
  assert (index, count, level, path, hits) == ("0", "1", "warning", str(cache), "0")
  written = sorted(os.listdir(cache))
  assert any(name.startswith("jit__lambda") for name in written), written
  assert "jit__lambda" in second  # the second setup's directory got the next program
  assert set(os.listdir(cache)) == set(written)  # ... and the first one nothing more
  (*_, hits), _ = _run_cache_script(str(cache), str(tmp_path / "b2"))
  assert int(hits) >= 1  # the second process loaded the compiled program instead of compiling


def test_empty_cache_dir_leaves_the_cache_off(restore_verbosity):
  import jax

  rt = runtime.setup_runtime({"log_level": "error"}, initialize_distributed=False)
  assert rt.compilation_cache_dir == "" and rt.log_level == "error"
  assert jax.config.jax_compilation_cache_dir in (None, "")


@pytest.mark.parametrize(
    "level,index,want",
    [
        ("info", 0, "info"),
        ("DEBUG", 0, "debug"),
        ("info", 3, "warning"),
        ("debug", 1, "warning"),
        ("error", 5, "error"),
        ("warning", 2, "warning"),
        ("fatal", 7, "fatal"),
    ],
)
def test_log_level_is_the_config_on_process_0_and_at_least_warning_elsewhere(level, index, want):
  assert runtime.log_level_for(level, index) == want


@pytest.mark.parametrize("bad", ["loud", "", 3, "warn"])
def test_bad_log_level_is_named_before_anything_is_set(bad, monkeypatch):
  monkeypatch.setattr(runtime, "set_compilation_cache", lambda path: pytest.fail("cache touched"))
  with pytest.raises(ValueError, match=f"log_level={bad!r}"):
    runtime.setup_runtime({"log_level": bad, "compilation_cache_dir": "/tmp/x"}, initialize_distributed=False)


def test_bad_cache_dir_type_is_named():
  with pytest.raises(ValueError, match="compilation_cache_dir=3"):
    runtime.setup_runtime({"compilation_cache_dir": 3}, initialize_distributed=False)


def _record(path, level):
  return std_logging.LogRecord("absl", level, path, 1, "msg", (), None)


@pytest.fixture
def restore_verbosity():
  before = logging.get_verbosity()
  yield
  logging.set_verbosity(before)
  logging.get_absl_handler().removeFilter(runtime._FILTER)


@pytest.mark.parametrize("index", [0, 2])
def test_setup_sets_absl_verbosity_per_process_and_filters_chatter_at_info(index, monkeypatch, restore_verbosity):
  import jax

  monkeypatch.setattr(jax, "process_index", lambda: index)
  rt = runtime.setup_runtime({"log_level": "info"}, initialize_distributed=False)
  handler = logging.get_absl_handler()
  if index == 0:
    assert rt.log_level == "info" and logging.get_verbosity() == logging.INFO
    orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/handler.py"
    ours = os.path.join(REPO, "htgrpo_jax", "trainer.py")
    assert not handler.filter(_record(orbax, std_logging.INFO))  # library chatter dropped
    assert handler.filter(_record(orbax, std_logging.WARNING))  # its warnings pass
    assert handler.filter(_record(ours, std_logging.INFO))  # our info lines pass
  else:
    assert rt.log_level == "warning" and logging.get_verbosity() == logging.WARNING
  runtime.setup_runtime({"log_level": "debug"}, initialize_distributed=False)
  orbax = "/x/site-packages/orbax/checkpoint/y.py"
  assert handler.filter(_record(orbax, std_logging.DEBUG)) or index != 0  # debug shows all


def test_configs_carry_the_runtime_keys():
  from htgrpo_jax import tasks

  for name in ("geneval.py", "mmada_geneval.py", "lumina_dimoo_geneval.py", "pretrain_shapes.py"):
    c = tasks.load_config_file(os.path.join(REPO, "configs", name))
    assert c.compilation_cache_dir == "" and c.log_level == "info", name
    assert runtime.log_level_for(c.log_level, 0) == "info"
    if name != "pretrain_shapes.py":
      assert c.profile_steps == "", name


@pytest.mark.parametrize(
    "script,args",
    [
        ("train.py", ["--config=configs/mmada_geneval.py"]),
        ("evaluate.py", ["--config=configs/mmada_geneval.py", "--which=base"]),
        ("pretrain.py", ["--config=configs/pretrain_shapes.py"]),
    ],
)
def test_entry_points_set_up_the_runtime_first(tmp_path, script, args):
  """A bad log level stops each entry point by name before any work; a good one with a cache dir
  creates the cache before the trainer (here: missing 8B prompt files) stops."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join("launch", script), *args]
  out = subprocess.run(
      cmd + ["--config.log_level=loud"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode != 0 and "log_level='loud'" in out.stderr, out.stderr[-2000:]
  if script == "pretrain.py":
    return  # a good level would pretrain for real
  cache = tmp_path / "cache"
  out = subprocess.run(
      cmd
      + [
          f"--config.compilation_cache_dir={cache}",
          "--config.log_level=warning",
          f"--config.workdir={tmp_path / 'run'}",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode != 0 and "world.train_prompts" in out.stderr, out.stderr[-2000:]
  assert cache.is_dir()


_REUSE_SCRIPT = r"""
import os, resource, sys
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
if sys.argv[1] == "reuse":
  from htgrpo_jax import runtime
  assert runtime.reuse_host_memory()
import jax, jax.numpy as jnp
x = jnp.ones((8192, 256), jnp.float32)
w = [jnp.full((256, 1024), 0.01), jnp.full((1024, 256), 0.01)]
f = jax.jit(jax.grad(lambda w, x: jnp.tanh(jnp.tanh(x @ w[0]) @ w[1]).sum()))
for _ in range(2):
  g = jax.block_until_ready(f(w, x))
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
h = jax.block_until_ready(f(w, x))
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, float(abs(g[0] - h[0]).max()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reuse_host_memory_changes_no_result():
  # The grad program's temp buffer (> 32 MB: two [8192, 1024] fp32 activations) is malloc'ed per call.
  # How many page faults the setting saves depends on the environment (docs/performance.md: 113k -> ~0
  # per update in one, 35k -> 29k per call of this program in a fresh CI virtualenv), so only the
  # faults of the default and the unchanged results are asserted here; bench/train_step.py --vs_torch
  # --reuse_host_memory prints the faults where it runs.
  faults = {}
  for mode in ("default", "reuse"):
    # As bench/train_step.py runs (JAX_PLATFORMS unset): with JAX_PLATFORMS=cpu this program still faults
    # ~18k pages per call with the setting on, through no mmap of glibc's (docs/performance.md).
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run(
        [sys.executable, "-c", _REUSE_SCRIPT, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    n, diff = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1].split()[1:]
    faults[mode] = int(n)
    assert float(diff) == 0.0  # same program, same results
  assert faults["default"] > 8192, faults  # > 32 MB of 4 KiB pages faulted in by one call


def test_machine_names_the_cpu_model_on_the_cpu_backend(monkeypatch):
  """Provenance records name the CPU model (bases made on two CPU kinds differ) and the software."""
  import jax
  import jaxlib

  m = runtime.machine()
  assert m["jax"] == jax.__version__ and m["jaxlib"] == jaxlib.__version__
  assert m["device"].startswith(f"{jax.devices()[0].device_kind} x{jax.device_count()}")
  monkeypatch.setattr(runtime, "cpu_model", lambda: "Some CPU 9000")
  assert runtime.machine()["device"] == f"cpu x{jax.device_count()} (Some CPU 9000)"
  monkeypatch.setattr(runtime, "cpu_model", lambda: "")
  assert runtime.machine()["device"] == f"cpu x{jax.device_count()}"
