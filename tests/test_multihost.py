"""Multi-host behaviour, exercised for real: several JAX processes on this machine, each with its own
fake CPU devices, joined by ``jax.distributed`` through a localhost coordinator."""
import textwrap

from tests.helpers import multiprocess

TRAIN_WITH_A_DIFFERENT_SEED = textwrap.dedent("""
    import os, pathlib, sys
    from htgrpo_jax import trainer
    from tests.helpers.configs import tiny_config
    cfg = tiny_config(pathlib.Path(sys.argv[1]), "run")
    cfg.seed = int(os.environ["JAX_PROCESS_ID"])  # one host started with another command line
    try:
      trainer.train(cfg)
    except ValueError as e:
      print("REFUSED:", e)
""")

SNIPPET = textwrap.dedent("""
    import sys
    from htgrpo_jax import parallel
    assert parallel.initialize_distributed("auto")
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    parallel.check_same_everywhere("the config", "same")
    try:
      parallel.check_same_everywhere("the config", f"differs on {jax.process_index()}")
    except ValueError as e:
      print("REFUSED:", e)
    print("PRIMARY" if parallel.is_primary() else "SECONDARY")
""")


def test_processes_join_and_a_config_that_differs_between_them_is_named():
  out = multiprocess.run(["-c", SNIPPET], num_processes=2, devices_per_process=4, timeout=300)
  for code, text in out:
    assert code == 0, text
    assert "REFUSED: the config differs between processes" in text, text
  assert "PRIMARY" in out[0][1] and "SECONDARY" in out[1][1]


def test_trainer_refuses_hosts_whose_configs_differ_before_building_anything(tmp_path):
  out = multiprocess.run(["-c", TRAIN_WITH_A_DIFFERENT_SEED, str(tmp_path)], num_processes=2,
                         devices_per_process=2, timeout=300)
  for code, text in out:
    assert code == 0, text
    assert "REFUSED: the config differs between processes" in text, text
  assert not (tmp_path / "run").exists() and not (tmp_path / "world").exists()  # nothing built
