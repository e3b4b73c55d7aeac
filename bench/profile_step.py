"""Where the compiled HT-GRPO update spends its time: per-XLA-op totals from a ``jax.profiler`` trace.

  python bench/profile_step.py --estimator=random_remask [--top=30] [--hlo_dir=/tmp/hlo]

Builds the same step as ``bench/train_step.py`` (the ``shapes`` size), runs it under ``jax.profiler.trace``
with XLA:CPU's per-thunk TraceMe events on, and prints the ops with the most wall time summed over the
traced calls (names are HLO instruction names: ``fusion.12``, ``dot.3``, ``scatter``...), their share of
the traced time and their op category (the HLO opcode or fusion kind read from the optimized HLO).
``--hlo_dir`` also writes the optimized HLO (``XLA_FLAGS=--xla_dump_to``) to look names up.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--estimator", default="htgrpo")
  ap.add_argument("--beta", type=float, default=0.01)
  ap.add_argument("--calls", type=int, default=2)
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--hlo_dir", default="")
  args = ap.parse_args()
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
  if args.hlo_dir:
    flags += f" --xla_dump_to={args.hlo_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*"
  os.environ["XLA_FLAGS"] = flags.strip()

  import jax  # noqa: PLC0415 (after XLA_FLAGS)
  from jax._src.lib import _profile_data  # noqa: PLC0415

  import train_step as ts  # noqa: PLC0415
  from htgrpo_jax import rl  # noqa: PLC0415

  bench_args = argparse.Namespace(**ts.SHAPES, micro_batch_size=0)
  config = ts.make_config(bench_args, args.estimator, args.beta)
  _, fn, params = ts.make_policy(bench_args)
  opt = rl.make_optimizer(1e-4, clip_norm=1.0, weight_decay=0.01)
  step = rl.make_train_step(fn, opt, config)
  rollout = ts.make_rollout(bench_args, __import__("numpy").random.default_rng(0))
  state = rl.TrainState.create(params, opt, with_reference=args.beta > 0)
  key = jax.random.key(0)
  compiled = step.lower(state, rollout, key).compile()
  kinds = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(", line)
    if m:
      kind = m.group(2)
      k = re.search(r"kind=(\w+)", line)
      called = re.search(r"calls=%?([\w.\-]+)", line)
      kinds[m.group(1)] = kind + (f":{k.group(1)}" if k else "") + (f" ({called.group(1)})" if called else "")
  state, _ = compiled(state, rollout, key)
  jax.block_until_ready(state)

  logdir = tempfile.mkdtemp(prefix="profile_step_")
  t0 = time.perf_counter()
  with jax.profiler.trace(logdir):
    for _ in range(args.calls):
      state, _ = compiled(state, rollout, key)
      jax.block_until_ready(state)
  wall = time.perf_counter() - t0
  pb = next(Path(logdir).rglob("*.xplane.pb"))
  data = _profile_data.ProfileData.from_file(str(pb))
  totals, counts = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in kinds:
          totals[ev.name] += ev.duration_ns / 1e9
          counts[ev.name] += 1
  traced = sum(totals.values())
  by_kind = collections.Counter()
  for name, s in totals.items():
    by_kind[kinds[name].split(" ")[0]] += s
  print(f"{args.calls} calls, wall {wall:.2f} s; summed op time {traced:.2f} s (ops on worker threads overlap)")
  print("by op kind:")
  for kind, s in by_kind.most_common(15):
    print(f"  {kind:28s} {s:8.3f} s  {100 * s / traced:5.1f}%")
  print(f"top {args.top} ops:")
  for name, s in totals.most_common(args.top):
    print(f"  {name:40s} {s:8.3f} s  {100 * s / traced:5.1f}%  x{counts[name]:<4d} {kinds[name]}")


if __name__ == "__main__":
  main()
