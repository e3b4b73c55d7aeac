"""Multi-host behaviour, exercised for real: several JAX processes on this machine, each with its own
fake CPU devices, joined by ``jax.distributed`` through a localhost coordinator."""

import http.server
import os
import textwrap
import threading

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
  out = multiprocess.run(
      ["-c", TRAIN_WITH_A_DIFFERENT_SEED, str(tmp_path)], num_processes=2, devices_per_process=2, timeout=300
  )
  for code, text in out:
    assert code == 0, text
    assert "REFUSED: the config differs between processes" in text, text
  assert not (tmp_path / "run").exists() and not (tmp_path / "world").exists()  # nothing built


def test_coordinator_flags_join_the_processes_and_a_locked_workdir_stops_every_one(tmp_path):
  """launch/train.py on a cluster JAX does not detect: each process is told the coordinator, the
  process count and its index by flags (no JAX_* variable). The workdir is held by another live
  run: process 0 takes the lock (it alone writes the run's files), is refused, and every process
  stops with an error naming why instead of waiting forever for process 0 at the next collective;
  process 1's error shows the two had joined one job."""
  from htgrpo_jax import workdir

  lock = workdir.WorkdirLock(str(tmp_path / "run")).acquire()  # another live run holds it
  argv = [
      os.path.join("launch", "train.py"),
      "--config=configs/geneval.py:htgrpo,tiny",
      f"--config.workdir={tmp_path / 'run'}",
      f"--config.world.data_dir={tmp_path / 'world'}",
      f"--config.model.checkpoint={tmp_path / 'base'}",
      "--config.log_level=warning",
  ]
  try:
    out = multiprocess.run(
        argv,
        num_processes=2,
        devices_per_process=2,
        timeout=300,
        coordinator_env=False,
        argv_of=lambda i, port: [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
    )
  finally:
    lock.release()
  (code0, text0), (code1, text1) = out
  assert code0 == 1 and "WorkdirLockedError" in text0 and str(tmp_path / "run") in text0, text0[-3000:]
  assert code1 == 1 and "process 0 refused to start this run" in text1, text1[-3000:]
  assert not (tmp_path / "world").exists()  # nothing built


ON_A_TPU_VM = textwrap.dedent("""
    import os
    import jax
    from jax._src.clusters import cloud_tpu_cluster
    # What this machine lacks of a Cloud TPU VM: TPU chips (JAX's libtpu setup, finding none, marks
    # the process as no TPU VM and tells it to skip the metadata server) and, on CPU, a
    # cross-process collectives backend. The metadata server is a local one.
    cloud_tpu_cluster.running_in_cloud_tpu_vm = True
    os.environ.pop("TPU_SKIP_MDS_QUERY", None)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from htgrpo_jax import parallel
    assert parallel.initialize_distributed("auto")
    parallel.check_same_everywhere("the config", "same")
    print("JOINED", jax.process_index(), jax.process_count(), jax.device_count())
""")


class _Metadata(http.server.BaseHTTPRequestHandler):
  """One TPU VM worker's metadata server: what JAX's GCE TPU cluster detection asks for."""

  def do_GET(self):  # noqa: N802
    key = self.path.rsplit("/", 1)[-1]
    attrs = {
        "agent-worker-number": str(self.server.worker),
        "tpu-env": "",
        "worker-network-endpoints": "127.0.0.1,127.0.0.1",
    }
    ok = self.headers.get("Metadata-Flavor") == "Google" and key in attrs
    body = attrs.get(key, "").encode() if ok else b"not found"
    self.send_response(200 if ok else 404)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)
    self.server.asked.append(key)

  def log_message(self, *args):
    pass


def test_a_cloud_tpu_slice_initialises_with_no_environment_variable_set():
  """Two processes started as the workers of a 2-host TPU VM slice are: no JAX_* coordinator
  variable, each worker's metadata server (here a local one per process) naming its index and
  the slice's hosts. ``initialize_distributed('auto')`` hands over to JAX's own cluster detection,
  which finds the slice and joins the processes."""
  servers = []
  for worker in range(2):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    srv.worker, srv.asked = worker, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    servers.append(srv)
  port = multiprocess.free_port()
  try:
    out = multiprocess.run(
        ["-c", ON_A_TPU_VM],
        num_processes=2,
        devices_per_process=2,
        timeout=300,
        coordinator_env=False,
        extra_env={"JAX_COORDINATOR_PORT": str(port)},
        env_of=lambda i: {"GCE_METADATA_IP": f"127.0.0.1:{servers[i].server_address[1]}"},
    )
  finally:
    for srv in servers:
      srv.shutdown()
      srv.server_close()
  for i, (code, text) in enumerate(out):
    assert code == 0, text[-3000:]
    assert f"JOINED {i} 2 4" in text, text[-3000:]
  for srv in servers:
    assert "agent-worker-number" in srv.asked and "worker-network-endpoints" in srv.asked, srv.asked
