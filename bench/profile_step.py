"""Where the compiled HT-GRPO update spends its time: per-XLA-op totals from a ``jax.profiler`` trace.

  python bench/profile_step.py --estimator=random_remask [--threads=1] [--top=30] [--hlo_dir=/tmp/hlo]

Builds the same step as ``bench/train_step.py`` (the ``shapes`` size), runs it under ``jax.profiler.trace``
with XLA:CPU's per-thunk TraceMe events on, and prints the ops with the most wall time summed over the
traced calls (names are HLO instruction names: ``fusion.12``, ``dot.3``, ``scatter``...), their share of
the traced time and their op category (the HLO opcode or fusion kind read from the optimized HLO).
``--hlo_dir`` also writes the optimized HLO (``XLA_FLAGS=--xla_dump_to``) to look names up.

It also sums the op time by phase of the step, from where each op sits in the optimized HLO: the loop
whose body differentiates (the K inner iterations: forward, backward, clipping, AdamW, the finiteness
guard), the other loops (the no-grad old and reference passes over the distinct canvases) and
everything outside loops (advantages, partition, canvases and loss sets, gathers, metrics). The
process's user and system CPU time and minor page faults per call (``getrusage``) say how much of the
wall time is the kernel's (e.g. faulting in XLA:CPU's temp buffer, which each call allocates afresh).
``--threads`` sets XLA:CPU's intra-op threads as ``bench/train_step.py --threads`` does (0: all CPUs).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


PHASES = (
    "K inner iterations: forward + backward",
    "no-grad old/reference passes",
    "outside loops (advantages, canvases, gathers, metrics)",
    "K inner iterations: the rest (clipping, AdamW, guard, ...)",
)


def op_phases(hlo: str) -> dict[str, str]:
  """Instruction name -> one of ``PHASES``, from the optimized HLO text of the step.

  Each instruction belongs to a computation; a computation is reached from the entry through while
  loops (``body=``) and calls (``calls=``, ``to_apply=``...). An instruction under a top-level while
  whose body (transitively) holds a backward op (``transpose(jvp`` in its op_name) is an inner
  iteration (its forward + backward when its op_name holds ``jvp(``, else the rest: clipping, AdamW,
  the finiteness guard, metric sums); under any other top-level while, an old/reference pass;
  otherwise outside loops.
  """
  comp_of, callees, whiles, entry, grad_comps = {}, collections.defaultdict(set), [], None, set()
  in_jvp = set()
  current = None
  for line in hlo.splitlines():
    head = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(2)
      entry = current if head.group(1) else entry
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not m or current is None:
      continue
    comp_of[m.group(1)] = current
    if "jvp(" in line:
      in_jvp.add(m.group(1))
    if "transpose(jvp" in line:
      grad_comps.add(current)
    for ref in re.findall(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line):
      callees[current].add(ref)
    for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line):
      callees[current].update(x.strip().lstrip("%") for x in group.split(","))
    if current == entry and " while(" in line:
      body = re.search(r"body=%?([\w.\-]+)", line)
      if body:
        whiles.append(body.group(1))

  def reach(root):
    seen, todo = set(), [root]
    while todo:
      c = todo.pop()
      if c not in seen:
        seen.add(c)
        todo.extend(callees.get(c, ()))
    return seen

  owner = {}
  for body in whiles:
    comps = reach(body)
    phase = PHASES[0] if comps & grad_comps else PHASES[1]
    for c in comps:
      owner.setdefault(c, phase)
  out = {name: owner.get(comp, PHASES[2]) for name, comp in comp_of.items()}
  return {n: PHASES[3] if p == PHASES[0] and n not in in_jvp else p for n, p in out.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--estimator", default="htgrpo")
  ap.add_argument("--beta", type=float, default=0.01)
  ap.add_argument("--calls", type=int, default=2)
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--hlo_dir", default="")
  ap.add_argument("--threads", type=int, default=0, help="cores (the process is pinned; 0 = all CPUs)")
  args = ap.parse_args()
  import cores  # noqa: PLC0415 (bench/cores.py)

  n = cores.limit(args.threads)
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
  phases = op_phases(compiled.as_text())
  state, _ = compiled(state, rollout, key)
  jax.block_until_ready(state)

  logdir = tempfile.mkdtemp(prefix="profile_step_")
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  with jax.profiler.trace(logdir):
    for _ in range(args.calls):
      state, _ = compiled(state, rollout, key)
      jax.block_until_ready(state)
  wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
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
  c = args.calls
  print(
      f"per call: user {(r1.ru_utime - r0.ru_utime) / c:.3f} s, system {(r1.ru_stime - r0.ru_stime) / c:.3f} s, "
      f"minor page faults {(r1.ru_minflt - r0.ru_minflt) / c:.0f} (the profiler's own work included)"
  )
  by_phase = collections.Counter()
  for name, s in totals.items():
    by_phase[phases.get(name, PHASES[2])] += s
  print(f"by phase ({n} intra-op thread(s)), per call:")
  for phase in PHASES:
    print(f"  {phase:58s} {by_phase[phase] / c:8.3f} s  {100 * by_phase[phase] / traced:5.1f}%")
    top = [(n, t) for n, t in totals.most_common() if phases.get(n, PHASES[2]) == phase][:3]
    for name, s in top:
      print(f"      {name:36s} {s / c:8.4f} s  x{counts[name] // c:<4d} {kinds[name]}")
  print("by op kind:")
  for kind, s in by_kind.most_common(15):
    print(f"  {kind:28s} {s:8.3f} s  {100 * s / traced:5.1f}%")
  print(f"top {args.top} ops:")
  for name, s in totals.most_common(args.top):
    print(f"  {name:40s} {s:8.3f} s  {100 * s / traced:5.1f}%  x{counts[name]:<4d} {kinds[name]}")


if __name__ == "__main__":
  main()
