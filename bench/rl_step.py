"""Where one RL step's time goes: sampling, VQ decoding, rewards, host transfers and the update.

  python bench/rl_step.py                                   # configs/geneval.py (shapes, P 8 x G 8, T 12)
  python bench/rl_step.py --quick                           # the tiny variant, 2 repeats (a smoke run)
  python bench/rl_step.py --variant=tiny --repeats=5
  python bench/rl_step.py --config=configs/geneval.py:maskgrpo --config.sampler.num_steps=8
  python bench/rl_step.py --flops_only                      # only the 8B configs' analytic table

Builds the run from the trainer's own pieces (``tasks.build_task``, ``run_config.plan`` /
``abstract_train_state``, ``trainer.initial_state`` / ``build_programs``) and runs one RL step as
``rollouts.collect_rollouts`` does, with a ``jax.block_until_ready`` boundary after every phase:

  data         the next prompt batch from the task's grain iterator (host)
  h2d          prompts (and, after the reward, the rewards) placed on the mesh
  sampling     the rollout sampler (T policy forwards, CFG rows included)
  decoding     the task's VQ decoder, codes -> uint8 pixels, on device
  d2h          the pixels fetched to the host (and the update's metrics, as the trainer logs them)
  rewards      the task's reward on the host (``WeightedReward.components`` + ``combine``)
  update       ``rl.make_train_step``'s compiled step (K inner updates)

Each phase is printed as its median seconds, its share of the phased step and images/s (B over its
time); medians are over ``--repeats`` steps after ``--warmup`` steps (the first one compiles every
program; its wall time is reported apart). Interleaved with the phased steps, the same step is also
run as the trainer runs it (``collect_rollouts`` then the train step, one sync at the end), so the
cost of the boundaries shows. The phased path samples the batch in one part (``rollout.chunks`` = 1);
the trainer path keeps the config's chunks.

Without a base checkpoint at ``model.checkpoint`` the bench writes random params there under
``--workdir`` instead of pretraining (times do not depend on the weights; the reward's host time
may, a little). The second table is the analytic model FLOPs (``htgrpo_jax.flops``, as ``aot.py``
counts them) of the 8B configs' sampler and update per RL step, and their shares; decoding and
rewards are not modelled there.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "geneval.py"), "Training config: path.py[:preset[,tiny]]."
)
_VARIANT = flags.DEFINE_enum(
    "variant",
    "default",
    ["default", "tiny"],
    "tiny: configs/geneval.py:<preset>,tiny (with --config left at its default)",
)
_QUICK = flags.DEFINE_bool("quick", False, "the tiny variant, 1 warm-up step, 2 repeats")
_WARMUP = flags.DEFINE_integer("warmup", 1, "steps before timing (the first compiles)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed steps per path (medians)")
_WORKDIR = flags.DEFINE_string("workdir", "", "world assets / random base params ('' : a temp dir)")
_FLOPS_ONLY = flags.DEFINE_bool("flops_only", False, "print only the 8B configs' analytic FLOPs table")
_BIG = flags.DEFINE_list(
    "big_configs",
    ["configs/mmada_geneval.py", "configs/lumina_dimoo_geneval.py"],
    "configs of the analytic FLOPs table",
)

PHASES = ("data", "h2d", "sampling", "decoding", "d2h", "rewards", "update")


def _config(workdir: str):
  from htgrpo_jax.config_util import load_config_file

  config = _CONFIG.value
  if _VARIANT.value == "tiny" or _QUICK.value:
    if not any(a.startswith("--config=") for a in sys.argv):
      config = load_config_file("configs/geneval.py", f"{config.rl.preset},tiny")
      for a in sys.argv:  # --config.x=y overrides, re-applied to the tiny config
        if a.startswith("--config.") and "=" in a:
          key, val = a[len("--config.") :].split("=", 1)
          _set(config, key, val)
  config.unlock()
  config.progress = False
  if config.world.kind == "shapes":
    default_dir = config.world.data_dir
    if not os.path.isabs(default_dir):
      config.world.data_dir = os.path.join(workdir, os.path.basename(default_dir))
  return config


def _set(config, dotted: str, text: str) -> None:
  *path, leaf = dotted.split(".")
  node = config
  for k in path:
    node = node[k]
  old = node[leaf]
  kind = type(old) if old is not None else None
  if kind is None:  # a typed placeholder
    kind = node.get_type(leaf) if hasattr(node, "get_type") else str
  node[leaf] = (text.lower() in ("1", "true")) if kind is bool else kind(text)


def _ensure_base(config, workdir: str) -> str | None:
  """Random base params at ``model.checkpoint`` when none is there (shapes world only)."""
  if config.world.kind != "shapes":
    return None
  import jax

  from htgrpo_jax import aot, paths, pretrain
  from htgrpo_jax.models import policy
  from htgrpo_jax.worlds.shapeeval.task import base_params_path

  if paths.isdir(base_params_path(config)):
    return None
  model_cfg, layout, _ = aot.build_model(config)
  size = f"d{model_cfg.d_model}_l{model_cfg.n_layers}_h{model_cfg.n_heads}_m{model_cfg.mlp_hidden}"
  config.model.checkpoint = os.path.join(workdir, f"random_base_{size}")  # one per model size
  if not paths.isdir(base_params_path(config)):
    pretrain.save_params(
        base_params_path(config), policy.init_params(model_cfg, layout, jax.random.PRNGKey(config.seed))
    )
  return f"no base checkpoint: random params at {config.model.checkpoint}"


def _median_row(times: list[float]) -> float:
  return statistics.median(times) if times else float("nan")


def measure(config) -> None:
  import jax
  import numpy as np

  from htgrpo_jax import parallel, rollouts, run_config, tasks, trainer
  from htgrpo_jax.rewards.base import as_weighted

  sync = jax.block_until_ready
  t0 = time.perf_counter()
  p = run_config.plan(config)
  mesh = parallel.make_mesh(**dict(config.mesh))
  run_config.check_mesh(p, mesh)
  task = tasks.build_task(config, log=lambda s: print(f"# {s}"))
  optimizer = run_config.make_optimizer(config, p)
  _, shardings, abstract_params = run_config.abstract_train_state(task, p, optimizer, mesh)
  params = task.load_base_params(abstract_params)
  state = trainer.initial_state(task, p, optimizer, shardings, params, mesh, config.seed)
  del params
  programs = trainer.build_programs(task, p, optimizer, shardings, mesh)
  data = iter(task.train_dataset(p.prompts_per_step, config.seed))
  combo = as_weighted(task.reward)
  root = jax.random.PRNGKey(config.seed)
  setup_s = time.perf_counter() - t0
  g, b = p.rl.group_size, p.batch_size

  def phased(step: int) -> dict[str, float]:
    nonlocal state
    t = {}
    s = time.perf_counter()
    batch = next(data)
    t["data"] = time.perf_counter() - s
    k_roll, k_step = jax.random.split(jax.random.fold_in(root, step))
    s = time.perf_counter()
    prompts_np = np.asarray(batch["prompt_tokens"], np.int32)
    prompts_b = sync(parallel.global_batch(np.repeat(prompts_np, g, axis=0), mesh))
    t["h2d"] = time.perf_counter() - s
    s = time.perf_counter()
    rec = sync(
        rollouts.sample_groups(
            programs.rollout_sampler,
            state.policy_params(),
            prompts_np,
            programs.uncond,
            p,
            k_roll,
            mesh,
            prompts_b=prompts_b,
        )
    )
    t["sampling"] = time.perf_counter() - s
    s = time.perf_counter()
    pixels = sync(programs.decode(rec.image_tokens))
    t["decoding"] = time.perf_counter() - s
    s = time.perf_counter()
    images = parallel.to_host(pixels)
    t["d2h"] = time.perf_counter() - s
    s = time.perf_counter()
    captions = [str(c) for c in np.repeat(batch["caption"], g)]
    metas = [str(m) for m in np.repeat(batch["meta"], g)]
    rewards = combo.combine(combo.components(captions, images, rows=f"0:{b}", meta=metas))
    t["rewards"] = time.perf_counter() - s
    s = time.perf_counter()
    rollout = sync(rec.to_rollout(prompts_b, parallel.global_batch(np.asarray(rewards, np.float32), mesh)))
    t["h2d"] += time.perf_counter() - s
    s = time.perf_counter()
    state, metrics = programs.train_step(state, rollout, k_step)
    sync(metrics)
    t["update"] = time.perf_counter() - s
    s = time.perf_counter()
    jax.device_get(metrics)  # the trainer's log line
    t["d2h"] += time.perf_counter() - s
    return t

  def trainer_path(step: int) -> float:
    nonlocal state
    s = time.perf_counter()
    batch = next(data)
    k_roll, k_step = jax.random.split(jax.random.fold_in(root, step))
    rollout, _ = trainer.collect_rollouts(
        programs.rollout_sampler,
        state.policy_params(),
        batch,
        k_roll,
        p=p,
        uncond=programs.uncond,
        decode=programs.decode,
        reward=task.reward,
        mesh=mesh,
    )
    state, metrics = programs.train_step(state, rollout, k_step)
    jax.device_get(metrics)
    return time.perf_counter() - s

  step = 0
  s = time.perf_counter()
  first = phased(step)
  first_s = time.perf_counter() - s
  step += 1
  for _ in range(max(_WARMUP.value - 1, 0)):
    phased(step)
    step += 1
  trainer_path(step)  # its own compiles (the chunks' concat, if any) stay out of the medians
  step += 1
  runs, whole = [], []
  for _ in range(_REPEATS.value):  # interleaved: the machine's drift hits both paths alike
    runs.append(phased(step))
    whole.append(trainer_path(step + 1))
    step += 2

  med = {k: _median_row([r[k] for r in runs]) for k in PHASES}
  total = sum(med.values())
  phased_total = _median_row([sum(r.values()) for r in runs])
  sc = p.rollout_sampler
  print(
      f"\nRL step of {config.world.kind}/{config.model.preset} ({config.rl.preset}): P {p.prompts_per_step} "
      f"x G {g} = B {b} images, T {sc.num_steps}, CFG {'on' if sc.use_cfg else 'off'}, "
      f"K {p.rl.num_iterations}, {len(jax.devices())} {jax.devices()[0].platform} device(s)"
  )
  print(
      f"setup (task, params, programs built, nothing compiled) {setup_s:.2f} s; first step (compiles "
      f"every program) {first_s:.2f} s, of which update {first['update']:.2f} s, sampling "
      f"{first['sampling']:.2f} s, decoding {first['decoding']:.2f} s"
  )
  print(f"medians over {_REPEATS.value} steps after {_WARMUP.value} warm-up step(s):\n")
  print("| phase | s | share | images/s |")
  print("|---|---|---|---|")
  for k in PHASES:
    print(f"| {k} | {med[k]:.4f} | {100 * med[k] / total:.1f}% | {b / med[k]:.1f} |")
  print(f"| **phased step** (median of sums) | {phased_total:.3f} | 100% | {b / phased_total:.1f} |")
  w = _median_row(whole)
  print(
      f"| trainer path (collect_rollouts + update, one sync) | {w:.3f} | {100 * w / phased_total:.0f}% "
      f"of phased | {b / w:.1f} |"
  )


def flops_table(measured=None) -> None:
  """``measured``: the timed config, put first so its FLOP shares sit beside its time shares."""
  from htgrpo_jax import aot, run_config
  from htgrpo_jax.config_util import load_config_file

  print("\nAnalytic model FLOPs per RL step (htgrpo_jax.flops, matmuls only; decoding and rewards not " "modelled):\n")
  print("| config | model | B | T | CFG | K | sampler TFLOP | update TFLOP | sampler share | update share |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  rows = [(path, load_config_file(path)) for path in _BIG.value]
  if measured is not None:
    rows.insert(0, ("(timed above)", measured))
  for path, config in rows:
    p = run_config.plan(config)
    model_cfg, layout, _ = aot.build_model(config, log=lambda s: None)
    t = types.SimpleNamespace(plan=p, model_cfg=model_cfg, layout=layout)  # what the count reads
    programs = ("sketch", "paint") if p.share_sketch else ("sampler",)
    samp = sum(aot.program_model_flops(t, prog) for prog in programs)
    upd = aot.program_model_flops(t, "train_step")
    tot = samp + upd
    sc = p.rollout_sampler
    print(
        f"| {os.path.basename(path)} | {config.model.preset} | {p.batch_size} | {sc.num_steps} | "
        f"{'on' if sc.use_cfg else 'off'} | {p.rl.num_iterations} | {samp / 1e12:,.3f} | {upd / 1e12:,.3f} | "
        f"{100 * samp / tot:.1f}% | {100 * upd / tot:.1f}% |"
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax's per-restore INFO lines
  if _QUICK.value:
    flags.FLAGS.warmup, flags.FLAGS.repeats = 1, 2
  if not _FLOPS_ONLY.value:
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="rl_step_")
    config = _config(workdir)
    note = _ensure_base(config, workdir)
    if note:
      print(f"# {note}")
    measure(config)
  flops_table(None if _FLOPS_ONLY.value else config)


if __name__ == "__main__":
  app.run(main)
