"""The cores a CPU bench gives both frameworks, set before JAX starts (XLA reads its flags once).

``limit(n)`` pins the process to ``n`` CPUs and sets XLA:CPU's intra-op pool to ``n`` threads
(PyTorch's ``torch.set_num_threads`` is set by the bench that imports it). The pin is what holds
XLA to ``n`` cores: with ``intra_op_parallelism_threads=1`` alone a 2048^2 fp32 matmul ran at 123
GFLOP/s on this 2-core AVX2 EPYC, above one core's peak, at ~1.85 cores of user time per second
(docs/performance.md, "Threads").
"""

import os
import sys


def requested(argv=None) -> int:
  """``--threads=N`` / ``--threads N`` from the command line, 0 when absent."""
  argv = sys.argv if argv is None else argv
  for i, a in enumerate(argv):
    if a.startswith("--threads="):
      return int(a.split("=", 1)[1])
    if a == "--threads" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 0


def limit(n: int = 0) -> int:
  """Pins the process to ``n`` of its CPUs (0: all) and sets XLA:CPU's threads to match; returns n."""
  cpus = sorted(os.sched_getaffinity(0))
  n = n or len(cpus)
  if n < len(cpus):
    os.sched_setaffinity(0, cpus[:n])
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_cpu_multi_thread_eigen={str(n > 1).lower()} intra_op_parallelism_threads={n}"
  ).strip()
  return n
