"""bench/profile_step.py's phases: each op of the compiled RL step is put in the loop it runs in.

``op_phases`` reads the optimized HLO of ``rl.make_train_step``: the ops of the differentiated K-iteration
loop (forward + backward, and the rest: clipping, AdamW, the guard), of the no-grad old/reference passes and
of everything outside loops. docs/performance.md's per-phase table rests on this split.
"""

import re
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import profile_step  # noqa: E402
import train_step as bench_train_step  # noqa: E402

from htgrpo_jax import rl  # noqa: E402
from tests.helpers.bench_args import tiny_bench_args  # noqa: E402

ARGS = tiny_bench_args()


def test_op_phases_split_the_step_by_loop():
  _, fn, params = bench_train_step.make_policy(ARGS)
  config = bench_train_step.make_config(ARGS, "htgrpo", 0.01)
  opt = rl.make_optimizer(1e-4, clip_norm=1.0, weight_decay=0.01)
  state = rl.TrainState.create(params, opt, with_reference=True)
  rollout = bench_train_step.make_rollout(ARGS, np.random.default_rng(0))
  hlo = rl.make_train_step(fn, opt, config, donate=False).lower(state, rollout, jax.random.key(0)).compile().as_text()
  phases = profile_step.op_phases(hlo)
  fwd_bwd, passes, outside, rest = profile_step.PHASES
  assert set(phases.values()) == {fwd_bwd, passes, outside, rest}
  names = lambda pattern: {m.group(1) for m in re.finditer(r"%([\w.\-]+) = [^\n]*" + pattern, hlo)}
  # Backward ops are in the K-iteration loop; the old/reference passes have no backward op.
  backward = names(r"op_name=\"[^\"]*transpose\(jvp")
  assert backward and {phases[n] for n in backward} == {fwd_bwd}
  # The finiteness guard and the gradient's global norm (clipping, the grad_norm metric) run once per
  # iteration, inside that loop but outside its forward + backward.
  guard, norm = names(r"op_name=\"[^\"]*/is_finite\""), names(r"op_name=\"[^\"]*while/body/closed_call/sqrt\"")
  assert guard and norm and {phases[n] for n in guard | norm} == {rest}
  # The no-grad passes run the model's matmuls too.
  assert any(phases[n] == passes for n in names(r" (?:dot|fusion)\("))
