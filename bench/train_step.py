"""HT-GRPO train-step throughput beside the machine's dense-matmul FLOP/s, measured in one run.

  python bench/train_step.py            # LLaDA 'shapes' size: d=128, 4 layers, 8x8 slots, C=128, B=64, K=6
  python bench/train_step.py --quick    # a small smoke run (d=64, 2 layers, B=16, K=3)
  python bench/train_step.py --estimator=random_remask --beta=0
  python bench/train_step.py --vs_torch --estimator=random_remask   # JAX vs eager PyTorch, same update
  python bench/train_step.py --vs_torch --torch_device=cuda --size=medium --precision=tf32   # on one GPU

With ``--vs_torch`` the same update also runs in eager PyTorch (``bench/torch_reference.py``: same weights,
canvases, loss, clipping and AdamW) and the two are timed alternately; both get the same cores
(``--threads``, default all CPUs of the process: the process is pinned to that many CPUs, and
``torch.set_num_threads`` and XLA:CPU's ``intra_op_parallelism_threads`` / Eigen pool are set to it
before JAX starts; the flags alone do not hold XLA:CPU to one core).

Prints the compile time of the step, its median wall time (steps/s), the achieved model FLOP/s, the FLOP/s of
a large fp32 matmul timed in the same run (interleaved repeats, medians), and their ratio.

FLOPs are counted analytically by ``htgrpo_jax.flops`` (XLA's cost_analysis counts a scan body once): one
forward of B sequences of L tokens is F = B * (layers * (8 L D^2 + 4 L^2 D + 6 L D M) + 2 N D C) matmul
FLOPs; the step runs (D_distinct old passes + D_distinct reference passes when beta > 0) forwards and K
forward+backward passes (3F each), D_distinct = distinct estimator canvases (2 for 'htgrpo' with the
structure context, K for the other estimators). Rematerialisation is not counted (model FLOPs);
tests/test_flops.py checks the count against the traced program's matmuls.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import cores  # noqa: E402  (bench/cores.py: imports nothing heavy)

if __name__ == "__main__":
  if "--reuse_host_memory" in sys.argv:  # before JAX starts its threads (htgrpo_jax.runtime imports nothing heavy)
    from htgrpo_jax import runtime

    print(f"reuse_host_memory applied: {runtime.reuse_host_memory()}")
  cores.limit(cores.requested())  # before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from htgrpo_jax import parallel, rl  # noqa: E402
from htgrpo_jax import flops  # noqa: E402
from htgrpo_jax.models.llada import LLaDA, get_config  # noqa: E402

TEXT_VOCAB = 256  # prompt ids [0, 256); then the mask id, then the C codebook ids


def make_policy(args):
  """LLaDA backbone over [prompt | slots] with the head sliced to the C codebook rows."""
  mask_id, offset = TEXT_VOCAB, TEXT_VOCAB + 1
  cfg = get_config(
      "shapes",
      d_model=args.d,
      n_layers=args.layers,
      n_heads=args.heads,
      mlp_hidden=args.mlp,
      vocab_size=offset + args.codebook,
      learned_pos_emb=args.prompt_len + args.tokens,
  )
  model = LLaDA(cfg)
  select = np.arange(args.prompt_len, args.prompt_len + args.tokens)

  def canvas_logits_fn(params, prompt, canvas):
    tokens = jnp.concatenate([prompt, jnp.where(canvas == rl.MASK, mask_id, canvas + offset)], axis=1)
    with nn.logical_axis_rules(parallel.LOGICAL_RULES):
      return model.apply({"params": params}, tokens, select=select, head_rows=(offset, args.codebook))

  dummy = jnp.zeros((1, args.prompt_len + args.tokens), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), dummy)["params"])
  return cfg, canvas_logits_fn, params


def make_rollout(args, rng):
  b, n, t = args.batch, args.tokens, args.sampler_steps
  step = np.stack([rng.permutation(np.arange(n) * t // n) for _ in range(b)])  # each step commits N/T slots
  return rl.Rollout(
      prompt_tokens=jnp.asarray(rng.integers(0, 256, (b, args.prompt_len)), jnp.int32),
      image_tokens=jnp.asarray(rng.integers(0, args.codebook, (b, n)), jnp.int32),
      commit_step=jnp.asarray(step, jnp.int32),
      commit_entropy=jnp.asarray(rng.uniform(0, np.log(args.codebook), (b, n)), jnp.float32),
      commit_logp=jnp.asarray(-rng.uniform(0, 5, (b, n)), jnp.float32),
      rewards=jnp.asarray(rng.random(b), jnp.float32),
  )


def make_config(args, estimator: str, beta: float) -> rl.HTGRPOConfig:
  return rl.HTGRPOConfig(
      group_size=args.group,
      num_sampler_steps=args.sampler_steps,
      n_global=args.stages[0],
      n_struct=args.stages[1],
      n_refine=args.stages[2],
      estimator=estimator,
      beta=beta,
      micro_batch_size=args.micro_batch_size or None,
  )


def time_vs_torch(args, config, model_cfg, params, main, state, rollout, key, others=None):
  """Median JAX and eager-PyTorch update times, alternating, after one warm-up each.

  ``main``: {name: compiled step} run on ``state``; ``others``: more compiled steps (other projection
  forms) timed in the same rotation, each on a fresh state from ``params``.
  Returns ({name: [seconds per repeat]}, {name: [(user s, system s, minor page faults) per repeat]}, threads,
  {library: median dense matmul FLOP/s}): the process's CPU time and page faults over each call
  (``getrusage``; the other framework is idle then), and ``library_matmuls``' rates in the same rotation.
  """
  import torch  # noqa: PLC0415 (bench-only dependency)
  import torch_reference  # noqa: PLC0415

  threads = args.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  torch.set_float32_matmul_precision(TORCH_PRECISION[args.precision])
  inputs = torch_reference.prepare_update(config, rollout, key, step=0)
  upd = torch_reference.build(
      model_cfg,
      params,
      config,
      prompt_len=args.prompt_len,
      mask_id=TEXT_VOCAB,
      offset=TEXT_VOCAB + 1,
      codebook=args.codebook,
      lr=1e-4,
      device=args.torch_device,
  )
  upd.run(inputs)  # warm-up (allocator, kernels)
  others = others or {}
  runs = {**main, **others}
  states = {name: state for name in main}
  for name, fn in others.items():
    fresh = rl.TrainState.create(jax.tree.map(jnp.asarray, params), args.opt, with_reference=config.beta > 0)
    states[name], _ = fn(fresh, rollout, key)  # warm-up
  times = {name: [] for name in list(runs) + ["torch"]}
  usage = {name: [] for name in times}  # (user s, system s, minor page faults) of each call

  def timed(name, call):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    call()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    times[name].append(t1 - t0)
    usage[name].append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))

  def jax_call(name, fn):
    states[name], _ = fn(states[name], rollout, key)
    jax.block_until_ready(states[name])

  mm_calls = library_matmuls(args.matmul, threads) if args.torch_device == "cpu" else {}
  mm_times = {name: [] for name in mm_calls}
  for _ in range(args.repeats):
    for name, fn in runs.items():
      timed(name, functools.partial(jax_call, name, fn))
    timed("torch", functools.partial(upd.run, inputs))
    for name, call in mm_calls.items():  # the libraries' own dense rate, under the same load
      t0 = time.perf_counter()
      call()
      mm_times[name].append(time.perf_counter() - t0)
  return times, usage, threads, {k: 2.0 * args.matmul**3 / statistics.median(v) for k, v in mm_times.items()}


def library_matmuls(m: int, threads: int) -> dict:
  """An m x m fp32 matmul in PyTorch (``torch.mm``) and in numpy's bundled OpenBLAS, each on ``threads``
  threads: the dense rate a hand-scheduled update could at best run its matmul FLOPs at."""
  import torch  # noqa: PLC0415

  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((m, m)).astype(np.float32) for _ in range(2))
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  calls = {"torch.mm": lambda: torch.mm(ta, tb)}
  try:
    import openblas_gemm  # noqa: PLC0415

    openblas_gemm.set_blas_threads(threads)
    calls["numpy (OpenBLAS)"] = lambda: a @ b
  except RuntimeError as e:
    print(f"numpy matmul rate not measured: {e}")
  for call in calls.values():
    call()  # warm-up
  return calls


# The `shapes` policy and batch (configs/geneval.py's model and step); bench/loss_grad.py and
# bench/profile_step.py time the same size.
SHAPES = dict(
    d=128,
    layers=4,
    heads=4,
    mlp=512,
    tokens=64,
    codebook=128,
    prompt_len=16,
    batch=64,
    group=8,
    stages=(2, 2, 2),
    sampler_steps=12,
)
# An accelerator-sized policy for --torch_device=cuda: d 1024, 8 layers, a 16x16 image (256 tokens) over
# MMaDA's 8192-entry codebook; the shapes model is too small to occupy a GPU (launch-bound).
MEDIUM = dict(SHAPES, d=1024, layers=8, heads=16, mlp=2816, tokens=256, codebook=8192, prompt_len=32)
DENSE_FORMS = ("flat", "einsum", "openblas")


def dense_form(name: str, flat, args):
  """The projection function of one ``--dense`` form (``flat``: the package's own)."""
  if name == "einsum":
    return lambda x, kernel, n_in: jnp.tensordot(x, kernel, axes=n_in)  # the pre-flat_matmul form
  if name == "openblas":
    import openblas_gemm  # noqa: PLC0415 (bench/, compiled on first use)

    openblas_gemm.load(threads=args.threads or len(os.sched_getaffinity(0)))
    return openblas_gemm.flat_matmul
  return flat


# --precision: fp32 matmuls at full precision for both frameworks, or both in TF32 (GPU tensor cores).
# The frameworks' defaults differ on a GPU (JAX may use TF32, PyTorch does not), so the bench sets both.
JAX_PRECISION = {"highest": "highest", "tf32": "tensorfloat32"}
TORCH_PRECISION = {"highest": "highest", "tf32": "high"}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--estimator", default="htgrpo", choices=rl.ESTIMATORS)
  ap.add_argument("--beta", type=float, default=0.01)
  ap.add_argument("--micro_batch_size", type=int, default=0)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--matmul", type=int, default=None, help="matmul size M (M x M @ M x M, fp32)")
  ap.add_argument("--vs_torch", action="store_true", help="also time bench/torch_reference.py, interleaved")
  ap.add_argument(
      "--threads",
      type=int,
      default=0,
      help="cores for XLA and torch: the process is pinned to that many CPUs (0 = all)",
  )
  ap.add_argument("--torch_device", default="cpu", help="where the PyTorch update runs ('cpu', 'cuda')")
  ap.add_argument("--size", default="shapes", choices=("shapes", "medium"), help="the policy and batch timed")
  ap.add_argument("--precision", default="highest", choices=tuple(JAX_PRECISION), help="fp32 matmul precision")
  ap.add_argument(
      "--reuse_host_memory",
      action="store_true",
      help="htgrpo_jax.runtime.reuse_host_memory() before JAX starts (process-wide: both frameworks)",
  )
  ap.add_argument(
      "--dense",
      default="flat",
      help="the projections' form, or a comma list of forms timed in one rotation with --vs_torch: 'flat' "
      "(the package), 'einsum' (named-axis contractions, before docs/performance.md), 'openblas' (an FFI "
      "call to OpenBLAS, bench/openblas_gemm.py); 'both' = 'flat,einsum'",
  )
  args = ap.parse_args()
  jax.config.update("jax_default_matmul_precision", JAX_PRECISION[args.precision])
  big = dict(SHAPES if args.size == "shapes" else MEDIUM, repeats=5, matmul=2048)
  quick = dict(
      d=64,
      layers=2,
      heads=4,
      mlp=256,
      tokens=64,
      codebook=128,
      prompt_len=16,
      batch=16,
      group=8,
      stages=(1, 1, 1),
      sampler_steps=8,
      repeats=3,
      matmul=1024,
  )
  for k, v in (quick if args.quick else big).items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)

  config = make_config(args, args.estimator, args.beta)
  from htgrpo_jax.models import llada  # noqa: PLC0415

  forms = ["flat", "einsum"] if args.dense == "both" else args.dense.split(",")
  unknown = [f for f in forms if f not in DENSE_FORMS]
  if unknown:
    raise SystemExit(f"--dense={args.dense}: unknown form(s) {unknown}; the forms are {DENSE_FORMS}")
  if len(forms) > 1 and not args.vs_torch:
    raise SystemExit(f"--dense={args.dense}: several forms are timed side by side only with --vs_torch")
  flat = llada.flat_matmul
  llada.flat_matmul = dense_form(forms[0], flat, args)  # traced by the step's canvas_logits_fn
  model_cfg, fn, params = make_policy(args)
  opt = args.opt = rl.make_optimizer(1e-4, clip_norm=1.0, weight_decay=0.01)
  step = rl.make_train_step(fn, opt, config)
  rollout = make_rollout(args, np.random.default_rng(0))
  state = rl.TrainState.create(params, opt, with_reference=args.beta > 0)
  key = jax.random.key(0)
  params_np = jax.tree.map(np.asarray, params)  # the state's buffers are donated below

  t0 = time.perf_counter()
  compiled = step.lower(state, rollout, key).compile()
  compile_s = time.perf_counter() - t0
  print(f"compiled the step in {compile_s:.2f} s; timing...", flush=True)
  others = {}
  for form in forms[1:]:
    llada.flat_matmul = dense_form(form, flat, args)
    others[f"jax_{form}"] = rl.make_train_step(fn, opt, config).lower(state, rollout, key).compile()
  llada.flat_matmul = flat
  state, _ = compiled(state, rollout, key)  # warm-up
  jax.block_until_ready(state)

  m = args.matmul
  a = jax.random.normal(jax.random.key(1), (m, m), jnp.float32)
  bmat = jax.random.normal(jax.random.key(2), (m, m), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, bmat))

  step_times, mm_times = [], []
  for _ in range(args.repeats):  # interleaved so both see the same machine load
    t0 = time.perf_counter()
    state, metrics = compiled(state, rollout, key)
    jax.block_until_ready(state)
    step_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, bmat))
    mm_times.append(time.perf_counter() - t0)

  n_distinct = max(rl.canvas_groups(config)) + 1
  length = args.prompt_len + args.tokens
  f = flops.matmul_flops(model_cfg, args.batch, length, args.tokens, args.codebook)
  passes = flops.train_step_passes(config)
  step_flops = passes * f
  step_s, mm_s = statistics.median(step_times), statistics.median(mm_times)
  step_fps, mm_fps = step_flops / step_s, 2.0 * m**3 / mm_s

  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  backend={jax.default_backend()}")
  print(
      f"model: d={model_cfg.d_model} layers={model_cfg.n_layers} heads={model_cfg.n_heads} "
      f"mlp={model_cfg.mlp_hidden} L={length} N={args.tokens} C={args.codebook} B={args.batch}"
  )
  print(
      f"dense: {args.dense}   threads: {args.threads or len(os.sched_getaffinity(0))}   "
      f"precision: {args.precision}   torch device: {args.torch_device}"
  )
  print(
      f"config: estimator={config.estimator} K={config.num_iterations} stages={args.stages} beta={config.beta} "
      f"micro_batch={config.micro_batch_size} distinct_canvases={n_distinct} forward_passes={passes} "
      f"(3 per inner update)"
  )
  print(f"compile_s            {compile_s:.2f}")
  print(
      f"step_s (median/{args.repeats})   {step_s:.4f}   steps/s {1.0 / step_s:.3f}   "
      f"(min {min(step_times):.4f}, max {max(step_times):.4f})"
  )
  print(f"step GFLOP (analytic) {step_flops / 1e9:.3f}   achieved GFLOP/s {step_fps / 1e9:.2f}")
  print(f"matmul {m}x{m} fp32 GFLOP/s (median) {mm_fps / 1e9:.2f}")
  print(f"ratio step/matmul FLOP/s {step_fps / mm_fps:.3f}")
  print(f"final loss {float(metrics['total']['loss']):.4f}  skipped {int(metrics['skipped'])}")
  if args.vs_torch:
    main_name = "jax" if forms[0] == "flat" else f"jax_{forms[0]}"
    times, usage, threads, mm_rates = time_vs_torch(
        args, config, model_cfg, params_np, {main_name: compiled}, state, rollout, key, others
    )
    print(f"vs eager PyTorch ({threads} intra-op threads each, {args.repeats} alternating repeats):")
    for name, ts_ in times.items():
      user, system, faults = (statistics.median(u[i] for u in usage[name]) for i in range(3))
      print(
          f"  {name + '_update_s':22s} (median) {statistics.median(ts_):.4f}   "
          f"(min {min(ts_):.4f}, max {max(ts_):.4f})   user {user:.3f} s  system {system:.3f} s  "
          f"page faults {faults:.0f}"
      )
    tt = times["torch"]
    for name in [n for n in times if n != "torch"]:
      jt = times[name]
      print(
          f"  speed {name}/torch {statistics.median(tt) / statistics.median(jt):.3f}x   (per-repeat: "
          f"{', '.join(f'{t / j:.2f}' for j, t in zip(jt, tt))})"
      )
    if mm_rates:
      # Every update here runs the same matmul FLOPs, so none can beat PyTorch's by more than the best
      # dense rate of the machine over PyTorch's achieved rate (the roofline of these FLOPs).
      rates = {"XLA": mm_fps, **mm_rates}
      torch_fps = step_flops / statistics.median(tt)
      best = max(rates, key=rates.get)
      print(
          f"  dense {m}x{m} GFLOP/s: "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())
          + f"; torch update achieved {torch_fps / 1e9:.1f} GFLOP/s = {torch_fps / rates[best]:.2f} of {best}'s"
          f" dense rate: at most {rates[best] / torch_fps:.2f}x PyTorch for any update of these FLOPs"
      )


if __name__ == "__main__":
  main()
