"""Efficacy studies: RL arms x seeds from one frozen base policy, at equal rollout budgets.

A study is a config (``configs/study.py``) naming a training config, a set of arms (an RL preset
plus dotted config overrides) and the seeds of each. ``run_study`` then

  1. pretrains the base policy once (``base_seed``) and scores it on the held-out prompts with the
     final evaluation's sample count: every arm's "base" column is this one evaluation;
  2. trains every (arm, seed) run to the same step count, so every arm sees the same number of
     rollout images (``prompts_per_step x group_size x total_steps``), each run resumable (the
     trainer's own checkpoints) and skipped when already finished;
  3. after each run rewrites the report: a Markdown table (``results_md``) with per-tag and overall
     held-out accuracy, 95 % intervals from a bootstrap over seeds and prompts, the paired change
     from the base, and PNG curves of held-out accuracy against rollout images and wall time.

Every run is judged with one evaluation key and one prompt list (``eval.seed``), so arms are
compared on the same prompts with the same sampling noise; intervals resample prompts (clusters of
a prompt's samples) and seeds.

The study's workdir and report paths may be URLs (``gs://bucket/study``): every file goes through
``htgrpo_jax.paths``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from htgrpo_jax import evaluate, paths
from htgrpo_jax.tasks import load_config_file


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  seed: int
  workdir: str


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  node, *path = [config, *dotted.split(".")]
  for part in path[:-1]:
    node = node[part]
  if path[-1] not in node:
    raise ValueError(f"study override {dotted!r}: no such key in the training config")
  node[path[-1]] = value


def parse_overrides(text: str) -> dict[str, Any]:
  """``"rl.beta=0.0; sampler.cfg_scale=1"`` -> {'rl.beta': 0.0, 'sampler.cfg_scale': 1}; values are
  Python literals (a bare word is a string)."""
  import ast

  out = {}
  for item in [x.strip() for x in (text or "").split(";") if x.strip()]:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"study override {item!r} is not 'key=value'")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def arm_table(cfg: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{arm: {'preset', 'overrides': {dotted key: value}, 'group'}} of the arms the study runs."""
  out = {}
  for group in ("main", "ablation"):
    for name in [a for a in cfg[f"{group}_arms"].split(",") if a]:
      if name not in cfg.arms:
        raise ValueError(f"{group}_arms: unknown arm {name!r}; defined arms: {sorted(cfg.arms)}")
      spec = cfg.arms[name]
      out[name] = dict(preset=spec.preset, overrides=parse_overrides(spec.get("overrides", "")), group=group)
  return out


def only_seeds(cfg: ml_collections.ConfigDict) -> set[int] | None:
  """``cfg.seeds`` ("1" or "1,2": train and report only those seeds; "" or absent: every seed).

  Raises:
    ValueError: naming ``seeds`` when it is not a comma list of ints >= 0.
  """
  text = str(cfg.get("seeds", "") or "").strip()
  if not text:
    return None
  try:
    out = {int(v) for v in text.split(",")}
  except ValueError:
    out = {-1}
  if min(out) < 0:
    raise ValueError(f"seeds={text!r}: want '' (every seed) or a comma list of seeds >= 0, e.g. '1,2'")
  return out


def plan_runs(cfg: ml_collections.ConfigDict) -> list[Run]:
  """Seed-major order, so a study stopped part-way has every arm at the same number of seeds;
  only ``cfg.seeds`` when set (``only_seeds``)."""
  arms = arm_table(cfg)
  seeds = {a: cfg.main_seeds if s["group"] == "main" else cfg.ablation_seeds for a, s in arms.items()}
  keep = only_seeds(cfg)
  return [
      Run(a, k, paths.join(cfg.workdir, a, f"seed{k}"))
      for k in range(max(seeds.values(), default=0))
      for a in arms
      if k < seeds[a] and (keep is None or k in keep)
  ]


def train_config(cfg: ml_collections.ConfigDict, arm: str | None, seed: int, workdir: str) -> ml_collections.ConfigDict:
  """The training config of one run: the study's training file with its shared overrides, the
  frozen base checkpoint, the run's seed and the arm's preset and overrides."""
  spec = arm_table(cfg)[arm] if arm is not None else dict(preset="htgrpo", overrides={})
  c = load_config_file(cfg.train_config, spec["preset"] + (f",{cfg.train_variant}" if cfg.get("train_variant") else ""))
  for k, v in {**parse_overrides(cfg.shared), **spec["overrides"]}.items():
    _set(c, k, v)
  c.seed = seed
  c.workdir = workdir
  c.model.checkpoint = cfg.get("base_checkpoint") or paths.join(cfg.workdir, "base")
  c.eval.at_start = False  # the base is scored once for the whole study
  return c


def _final_step(c: ml_collections.ConfigDict) -> str:
  return f"step{c.total_steps:05d}"


def run_study(
    cfg: ml_collections.ConfigDict,
    *,
    log: Callable[[str], None] = print,
    max_runs: int | None = None,
    shard: tuple[int, int] = (0, 1),
    report: bool = True,
) -> str:
  """Runs (or resumes) a study and writes its report; returns the report's Markdown.

  ``shard=(i, n)``: run only every n-th unfinished run starting at i (``launch/study.py
  --workers=n`` starts n such processes after scoring the base, so one accelerator host trains
  several runs at once); ``report=False`` leaves the report to the caller.
  """
  from tqdm import tqdm
  from htgrpo_jax import trainer

  base_dir = paths.join(cfg.workdir, "base_eval")
  base_cfg = train_config(cfg, None, cfg.base_seed, base_dir)
  if trainer.load_eval_samples(base_dir, "base") is None:
    if shard != (0, 1):
      raise RuntimeError(
          f"study shard {shard}: the base is not scored yet in {base_dir}; score it "
          "once (run_study with the default shard) before starting workers"
      )
    log("Scoring the frozen base policy (pretraining it first when missing)...")
    trainer.evaluate_checkpoint(
        base_cfg, which="base", out_dir=base_dir, samples_per_prompt=base_cfg.eval.final_samples_per_prompt, log=log
    )
  runs = plan_runs(cfg)
  todo = [
      r
      for r in runs
      if trainer.load_eval_samples(r.workdir, _final_step(train_config(cfg, r.arm, r.seed, r.workdir))) is None
  ]
  log(f"{len(runs) - len(todo)} of {len(runs)} runs already finished.")
  todo = todo[shard[0] :: shard[1]]
  md = write_report(cfg) if report else ""
  for r in tqdm(todo[:max_runs], desc="study runs", dynamic_ncols=True):
    c = train_config(cfg, r.arm, r.seed, r.workdir)
    c.progress = cfg.get("progress", True)
    t0 = time.time()
    out = trainer.train(c, log=log)
    paths.write_text_atomic(  # this call's wall time, and where it ran (the report names the hardware)
        paths.join(r.workdir, "wall.json"), json.dumps(dict(seconds=time.time() - t0, device=device_name()))
    )
    if out["interrupted"]:  # SIGTERM/SIGINT: the run saved its step; the study stops with it
      log(f"{out['interrupted']}: study stopped in {r.arm} seed {r.seed} at step {out['step']}")
      break
    md = write_report(cfg) if report else ""
  return md


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def device_name() -> str:
  """'NVIDIA H200 x1', 'cpu x1 (AMD EPYC)': what this process trains on (kind and count of JAX
  devices; the CPU's model on the CPU backend, ``runtime.machine``)."""
  from htgrpo_jax import runtime

  return runtime.machine()["device"]


def trained_on(runs: Sequence[str]) -> str:
  """'NVIDIA H200 x1 (16 runs)': the devices the given run workdirs recorded in their wall.json
  ('' when none recorded one)."""
  counts: dict[str, int] = {}
  for w in runs:
    path = paths.join(w, "wall.json")
    if paths.exists(path):
      with paths.open(path, encoding="utf-8") as f:
        dev = json.load(f).get("device")
      if dev:
        counts[dev] = counts.get(dev, 0) + 1
  return ", ".join(f"{d} ({n} run{'s' * (n != 1)})" for d, n in sorted(counts.items()))


def _eval_curve(workdir: str) -> list[tuple[int, dict[str, np.ndarray]]]:
  from htgrpo_jax import trainer

  out = []
  if paths.isdir(paths.join(workdir, "evals")):
    for name in sorted(paths.listdir(paths.join(workdir, "evals"))):
      if name.startswith("step"):
        s = trainer.load_eval_samples(workdir, name)
        if s is not None:
          out.append((int(name[4:]), s))
  return out


def _step_seconds(workdir: str) -> dict[int, float]:
  """Cumulative training seconds (rollouts + updates, evaluations excluded) at each step."""
  path, out, total = paths.join(workdir, "metrics.jsonl"), {}, 0.0
  if paths.exists(path):
    with paths.open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          m = json.loads(line)
          total += float(m.get("time/step_s", 0.0))
          out[int(m["step"])] = total
  return out


def collect(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Finished runs' final evaluations, the base evaluation and every run's curve."""
  from htgrpo_jax import trainer

  base = trainer.load_eval_samples(paths.join(cfg.workdir, "base_eval"), "base")
  finals: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  curves: dict[str, dict[int, list]] = {}
  for r in plan_runs(cfg):
    c = train_config(cfg, r.arm, r.seed, r.workdir)
    f = trainer.load_eval_samples(r.workdir, _final_step(c))
    # A study may read runs that a longer study sharing them has trained on: its curves end at
    # its own budget.
    curve = [(step, s) for step, s in _eval_curve(r.workdir) if step <= c.total_steps]
    if curve:
      curves.setdefault(r.arm, {})[r.seed] = (curve, _step_seconds(r.workdir), c.prompts_per_step * c.rl.group_size)
    if f is not None:
      finals.setdefault(r.arm, {})[r.seed] = f
  return dict(base=base, finals=finals, curves=curves)


def images_to_reach(curve: np.ndarray, target: float) -> float:
  """Rollout images at which a mean curve first reaches ``target``, linear between evaluations;
  inf when it never does.

  Args:
    curve: float64[n, 2] (rollout images, held-out overall), images increasing, from (0, base).
  """
  for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
    if y1 >= target:
      return float(x0 if y0 >= target else x0 + (x1 - x0) * (target - y0) / (y1 - y0))
  return float("inf")


def reach_lines(data: dict[str, Any], arms: Sequence[str], ref: str, n_boot: int = 1000, seed: int = 0) -> list[str]:
  """The sample-efficiency table: for each arm, the rollout images its seed-mean curve needs to
  reach the reference arm's final seed-mean score, and the reference's budget over that (how many
  times fewer images), with 95 % intervals from a bootstrap that resamples prompts (one draw for
  every evaluation: paired) and then seeds within each arm, as the main table does."""
  base, finals = data["base"], data["finals"]
  # Finished seeds only (as in the main table): a run still going would cut its arm's curve short.
  curves = {a: {k: c for k, c in runs.items() if k in finals.get(a, {})} for a, runs in data["curves"].items()}
  curves = {a: runs for a, runs in curves.items() if runs}
  if ref not in curves:
    return []
  arms = [a for a in arms if a in curves]
  # Evaluation steps every seed of an arm has; one score array per (arm, seed, step).
  steps = {a: sorted(set.intersection(*[{s for s, _ in c} for c, _, _ in curves[a].values()])) for a in arms}
  # Intermediate evaluations draw fewer samples per prompt than the final one: compare per-prompt
  # means (each prompt one cluster; with equal samples per prompt the overall is unchanged).
  ids, first = np.unique(base["prompt_index"], return_index=True)
  tags = np.asarray(base["tags"])[first]

  def per_prompt(e: dict[str, np.ndarray], name: str) -> np.ndarray:
    if not np.array_equal(np.unique(e["prompt_index"]), ids):
      raise ValueError(f"study: {name} was evaluated on other prompts than the base")
    inv = np.searchsorted(ids, e["prompt_index"])
    return np.bincount(inv, e["strict"], len(ids)) / np.bincount(inv, minlength=len(ids))

  arrays, where = [per_prompt(base, "the base")], {}
  for a in arms:
    for k, (c, _, per_step) in curves[a].items():
      by_step = dict(c)
      for st in steps[a]:
        where[a, k, st] = len(arrays)
        arrays.append(per_prompt(by_step[st], f"run {a}/seed{k} step {st}"))
  draws = evaluate.bootstrap_draws(tags, ids, arrays, n_boot=n_boot, seed=seed)["overall"]  # [A, B]
  rng = np.random.default_rng(seed + 1)

  def mean_curves(a: str, d: np.ndarray) -> np.ndarray:
    """float64[n_boot, n_steps + 1, 2]: the arm's seed-mean curve in every draw (seeds resampled
    when d is the bootstrap, the observed seeds when d holds one column)."""
    seeds = sorted(curves[a])
    per_step = next(iter(curves[a].values()))[2]
    ys = np.stack([[d[where[a, k, st]] for st in steps[a]] for k in seeds])  # [seeds, n, B]
    pick = rng.integers(0, len(seeds), (d.shape[1], len(seeds))) if d.shape[1] > 1 else np.arange(len(seeds))[None]
    y = ys[pick, :, np.arange(d.shape[1])[:, None]].mean(1)  # [B, n]
    y = np.concatenate([d[0][:, None], y], 1)
    x = np.broadcast_to(np.asarray([0] + [st * per_step for st in steps[a]], np.float64), y.shape)
    return np.stack([x, y], -1)

  observed = np.asarray([[evaluate.tag_scores(tags, a)["overall"]] for a in arrays])  # [A, 1]
  ref_obs, ref_draw = mean_curves(ref, observed), mean_curves(ref, draws)
  target_obs, budget = ref_obs[0, -1, 1], ref_obs[0, -1, 0]
  if target_obs <= ref_obs[0, 0, 1]:
    # Every curve starts at the base: "images to reach" a final at or below it is 0 for every arm.
    return [
        f"`{ref}`'s final score ({target_obs:.3f}) is not above the base's ({ref_obs[0, 0, 1]:.3f}): "
        "there is no rollout budget to compare arms against (no sample-efficiency table).",
        "",
    ]
  lines = [
      f"Rollout images to reach `{ref}`'s final score ({target_obs:.3f}, its seed mean after "
      f"{budget:.0f} images), linear between evaluations, with 95 % intervals (prompts and "
      f"seeds resampled, the target with them; 'never' = not reached within the budget):",
      "",
      f"| arm | images to reach {ref}'s final | {ref}'s budget / those images |",
      "|---|---:|---:|",
  ]
  for a in [a for a in arms if a != ref]:
    obs = images_to_reach(mean_curves(a, observed)[0], target_obs)
    cur = mean_curves(a, draws)
    x = np.asarray([images_to_reach(cur[b], ref_draw[b, -1, 1]) for b in range(n_boot)])
    # inf images ('never') -> 0x; a draw whose target is at or below its own base needs 0 images -> inf x.
    with np.errstate(divide="ignore"):
      lo, hi = interval_with_inf(x)
      rlo, rhi = interval_with_inf(budget / x)
    img = lambda v: "never" if not np.isfinite(v) else f"{v:.0f}"
    rat = lambda v: "inf" if not np.isfinite(v) else f"{v:.2f}x"
    lines.append(f"| {a} | {img(obs)} [{img(lo)}, {img(hi)}] | {rat(budget / obs)} [{rat(rlo)}, {rat(rhi)}] |")
  return lines + [""]


def interval_with_inf(draws: np.ndarray) -> tuple[float, float]:
  """The 95 % percentile interval of bootstrap draws that may hold +inf. Linear interpolation
  meets inf - inf (or inf x 0) at a bound next to an infinite draw and gives nan there; such a
  bound is taken from the nearest draw instead, so it reads inf or a finite value, never nan."""
  with np.errstate(invalid="ignore"):
    q = np.percentile(draws, [2.5, 97.5])
  near = np.percentile(draws, [2.5, 97.5], method="nearest")
  return tuple(float(n if np.isnan(v) else v) for v, n in zip(q, near))


def seed_prompt_bootstrap(
    base: dict[str, np.ndarray], finals: dict[str, dict[int, dict]], n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
  """Bootstrap draws of each arm's seed-mean accuracy (per tag and overall) and of its change
  from the base, resampling prompts (one draw shared by every array: paired) and then seeds.

  Returns:
    {arm: {tag: float64[n_boot]}, ...} and {arm + ':change': {tag: float64[n_boot]}}.
  """
  keys = [(a, k) for a in finals for k in sorted(finals[a])]
  for a, k in keys:
    if not np.array_equal(finals[a][k]["prompt_index"], base["prompt_index"]):
      raise ValueError(f"study: run {a}/seed{k} was evaluated on other prompts than the base")
  draws = evaluate.bootstrap_draws(
      base["tags"],
      base["prompt_index"],
      [base["strict"]] + [finals[a][k]["strict"] for a, k in keys],
      n_boot=n_boot,
      seed=seed,
  )
  rng = np.random.default_rng(seed + 1)
  out = {}
  for a in finals:
    rows = [1 + i for i, (aa, _) in enumerate(keys) if aa == a]
    pick = np.asarray(rows)[rng.integers(0, len(rows), (n_boot, len(rows)))]  # seeds, resampled
    cols = np.arange(n_boot)[:, None]
    out[a] = {t: d[pick, cols].mean(1) for t, d in draws.items()}
    out[a + ":change"] = {t: out[a][t] - d[0] for t, d in draws.items()}
  return out


def compare_evaluations(
    base_dir: str, arms: dict[str, Sequence[str]], ref: str | None = None, n_boot: int = 2000
) -> str:
  """A Markdown table of evaluation folders scored on one key: each arm's seed-mean overall strict
  accuracy, its change from the base and its difference from ``ref``, with 95 % intervals
  (``seed_prompt_bootstrap``: prompts resampled within tags, one draw shared by every folder, then
  seeds). For evaluations a study did not make, e.g. trained runs judged with another sampler.

  Args:
    base_dir: the base policy's evaluation folder (``evals/<name>``, ``samples.jsonl``).
    arms: {arm: [one evaluation folder per seed]}, every folder on the base's prompts and samples.
    ref: the arm the last column is against (None: no such column).
  """
  if ref is not None and ref not in arms:
    raise ValueError(f"compare_evaluations: ref {ref!r} is not one of the arms {sorted(arms)}")
  base = evaluate.read_samples(base_dir)
  finals = {a: dict(enumerate(evaluate.read_samples(d) for d in dirs)) for a, dirs in arms.items()}
  for a, runs in finals.items():
    for k, r in runs.items():
      if not np.array_equal(r["prompt_index"], base["prompt_index"]):
        raise ValueError(f"compare_evaluations: {arms[a][k]} holds other prompts or samples than {base_dir}")
  draws = seed_prompt_bootstrap(base, finals, n_boot=n_boot)
  overall = lambda r: evaluate.tag_scores(r["tags"], r["strict"])["overall"]
  point = {a: float(np.mean([overall(r) for r in runs.values()])) for a, runs in finals.items()}
  b = overall(base)

  def fmt(value: float, d: np.ndarray, sign: str = "+") -> str:
    lo, hi = evaluate.interval(d)
    return f"{value:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"

  lines = [
      f"| arm | seeds | each seed | overall | change from the base ({b:.3f}) |" + (f" vs {ref} |" if ref else ""),
      "|---|---:|---|---:|---:|" + ("---:|" if ref else ""),
  ]
  for a, runs in finals.items():
    each = " / ".join(f"{overall(r):.3f}" for r in runs.values())
    row = f"| {a} | {len(runs)} | {each} | {fmt(point[a], draws[a]['overall'], '')} |"
    row += f" {fmt(point[a] - b, draws[a + ':change']['overall'])} |"
    if ref:
      diff = draws[a]["overall"] - draws[ref]["overall"]
      row += " - |" if a == ref else f" {fmt(point[a] - point[ref], diff)} |"
    lines.append(row)
  return "\n".join(lines) + "\n"


def pooled_difference(
    studies: dict[str, ml_collections.ConfigDict], arm: str, ref: str, n_boot: int = 4000, seed: int = 0
) -> dict[str, Any]:
  """``arm`` minus ``ref`` (seed-mean overall strict accuracy) in each study and averaged over the
  studies with equal weight: no single study may separate two arms that every study puts in the
  same order. Each study's bootstrap (prompts, then seeds; ``seed_prompt_bootstrap`` on those two
  arms alone) is drawn independently of the others', and the pooled draws are the studies' draws
  averaged draw by draw. Studies that share a base are not independent; ``leave_one_out`` shows
  how much any one study carries.

  Returns:
    dict(per_study={name: dict(point, draws float64[n_boot], seeds=(n_arm, n_ref), base, workdir)},
    pooled=dict(point, draws), leave_one_out={name: dict(point, draws)}).
  """
  if len(studies) < 1:
    raise ValueError("pooled_difference: no studies given")
  per: dict[str, dict[str, Any]] = {}
  for i, (name, cfg) in enumerate(studies.items()):
    data = collect(cfg)
    missing = [a for a in (arm, ref) if a not in data["finals"]]
    if data["base"] is None or missing:
      what = "its base evaluation" if data["base"] is None else f"a finished run of {', '.join(missing)}"
      raise ValueError(f"pooled_difference: study {name!r} ({cfg.workdir}) has no {what}")
    finals = {a: data["finals"][a] for a in (arm, ref)}
    boot = seed_prompt_bootstrap(data["base"], finals, n_boot=n_boot, seed=seed + 2 * i)  # independent draws
    overall = lambda e: evaluate.tag_scores(e["tags"], e["strict"])["overall"]
    mean = lambda a: float(np.mean([overall(x) for x in finals[a].values()]))
    per[name] = dict(
        point=mean(arm) - mean(ref),
        draws=boot[arm]["overall"] - boot[ref]["overall"],
        seeds=(len(finals[arm]), len(finals[ref])),
        base=overall(data["base"]),
        workdir=cfg.workdir,
    )

  def pool(names: Sequence[str]) -> dict[str, Any]:
    return dict(
        point=float(np.mean([per[n]["point"] for n in names])),
        draws=np.mean([per[n]["draws"] for n in names], axis=0),
    )

  names = list(per)
  return dict(
      per_study=per,
      pooled=pool(names),
      leave_one_out={n: pool([m for m in names if m != n]) for n in names} if len(names) > 2 else {},
  )


def pooled_report(result: dict[str, Any], arm: str, ref: str, command: str = "") -> str:
  """``pooled_difference``'s result as Markdown: one row per study, the pooled row, and the pooled
  difference without each study in turn."""

  def fmt(r: dict[str, Any]) -> str:
    lo, hi = evaluate.interval(r["draws"])
    return f"{r['point']:+.3f} [{lo:+.3f}, {hi:+.3f}]"

  n = len(result["per_study"])
  lines = [
      f"# `{arm}` against `{ref}`, pooled over {n} studies",
      "",
      f"Each study's paired difference in held-out strict accuracy (`{arm}` minus `{ref}`, seed means, "
      "overall), with a 95 % bootstrap interval over prompts and seeds, then their equal-weight mean, "
      "each study's bootstrap drawn independently and averaged draw by draw. Studies that share a "
      "base policy are not independent, so the table also gives the pooled difference without each "
      "study." + (f" Written by `{command}`." if command else ""),
      "",
      f"| study | workdir | base overall | seeds ({arm} / {ref}) | {arm} - {ref} |",
      "|---|---|---:|---:|---:|",
  ]
  for name, r in result["per_study"].items():
    lines.append(f"| {name} | `{r['workdir']}` | {r['base']:.3f} | {r['seeds'][0]} / {r['seeds'][1]} | {fmt(r)} |")
  lines.append(f"| **pooled (equal weight)** | | | | **{fmt(result['pooled'])}** |")
  if result["leave_one_out"]:
    lines += ["", "| pooled without | difference |", "|---|---:|"]
    lines += [f"| {name} | {fmt(r)} |" for name, r in result["leave_one_out"].items()]
  return "\n".join(lines) + "\n"


def base_recipe_lines(cfg: ml_collections.ConfigDict) -> list[str]:
  """How the frozen base was pretrained, from its ``pretrain.json`` (none when it has no record)."""
  from htgrpo_jax import pretrain

  path = paths.join(cfg.get("base_checkpoint") or paths.join(cfg.workdir, "base"), pretrain.RECIPE_FILE)
  if not paths.isfile(path):
    return []
  with paths.open(path) as f:
    rec = json.load(f)
  r = rec["recipe"]
  held = f", held-out masked-token loss {rec['heldout_loss']:.4f}" if "heldout_loss" in rec else ""
  on = f", made on {m['device']} with JAX {m['jax']}" if (m := rec.get("made_on")) else ""
  return [
      f"Base policy: {rec['steps_done']} pretraining steps of batch {r['batch_size']} at peak learning "
      f"rate {r['optim']['learning_rate']:g} (seed {r['seed']}){held}{on}.",
      "",
  ]


def write_report(cfg: ml_collections.ConfigDict) -> str:
  """Writes the study's Markdown table and PNG curves; returns the Markdown."""
  data = collect(cfg)
  base, finals = data["base"], data["finals"]
  if base is None:
    return ""
  tags = [t for t in evaluate.tag_scores(base["tags"], base["strict"]) if t != "overall"]
  base_acc = evaluate.tag_scores(base["tags"], base["strict"])
  boot = seed_prompt_bootstrap(base, finals) if finals else {}
  fmt = lambda v, d: f"{v:.3f} [{evaluate.interval(d)[0]:.3f}, {evaluate.interval(d)[1]:.3f}]"
  arms = arm_table(cfg)
  ref = cfg.get("reference_arm", "")
  c0 = train_config(cfg, None, cfg.base_seed, "")
  images = c0.total_steps * c0.prompts_per_step * c0.rl.group_size
  lines = [
      f"# {cfg.title}",
      "",
      f"Every arm starts from one frozen base policy "
      f"(`{cfg.get('base_checkpoint') or paths.join(cfg.workdir, 'base')}`) and trains "
      f"{c0.total_steps} RL steps of {c0.prompts_per_step} prompts x G = {c0.rl.group_size} "
      f"images ({images} rollout images per run). Held-out strict accuracy over "
      f"{len(set(base['prompt_index'].tolist()))} prompts x "
      f"{len(base['strict']) // max(1, len(set(base['prompt_index'].tolist())))} samples, "
      "one evaluation key for every run. Brackets: 95 % bootstrap intervals over prompts "
      "and seeds; the change is paired with the base on the same prompts"
      + (
          f", and `vs {ref}` is the paired difference from the `{ref}` arm (an interval "
          "that excludes 0 separates the two)."
          if ref
          else "."
      )
      + (f" Trained on: {hw}." if (hw := trained_on([r.workdir for r in plan_runs(cfg)])) else "")
      + (f" Seeds: {cfg.seeds} only (`seeds={cfg.seeds}`)." if only_seeds(cfg) is not None else ""),
      "",
      "| arm | seeds | base overall | final overall | change | "
      + (f"vs {ref} | " if ref else "")
      + " | ".join(tags)
      + " |",
      "|---|---:|---:|---:|---:|" + ("---:|" if ref else "") + "---:|" * len(tags),
  ]
  acc = {
      a: {
          t: float(np.mean([evaluate.tag_scores(x["tags"], x["strict"])[t] for x in finals[a].values()]))
          for t in tags + ["overall"]
      }
      for a in finals
  }
  for a in [a for a in arms if a in finals]:
    vs = ""
    if ref:
      vs = (
          "- | "
          if a == ref or ref not in finals
          else fmt(acc[a]["overall"] - acc[ref]["overall"], boot[a]["overall"] - boot[ref]["overall"]) + " | "
      )
    lines.append(
        f"| {a} | {len(finals[a])} | {base_acc['overall']:.3f} | "
        f"{fmt(acc[a]['overall'], boot[a]['overall'])} | "
        f"{fmt(acc[a]['overall'] - base_acc['overall'], boot[a + ':change']['overall'])} | "
        + vs
        + " | ".join(f"{acc[a][t]:.3f}" for t in tags)
        + " |"
    )
  variant = f",{cfg.train_variant}" if cfg.get("train_variant") else ""
  lines += (
      ["", "| base | " + " | ".join(f"{t} {base_acc[t]:.3f}" for t in tags + ["overall"]) + " |", ""]
      + base_recipe_lines(cfg)
      + (reach_lines(data, list(arms), ref) if ref else [])
      + [
          "Arms: "
          + "; ".join(
              f"`{a}` = `{cfg.train_config}:{s['preset']}{variant}`"
              + (f" with {s['overrides']}" if s["overrides"] else "")
              for a, s in arms.items()
          )
          + f". Every run: `{cfg.shared}`.",
          "",
          f"![held-out accuracy vs rollout images and wall time]({os.path.basename(cfg.curves_png)})",
          "",
      ]
  )
  single = [a for a in arms if len(finals.get(a, {})) == 1]
  if single:  # a bootstrap over one seed cannot see seed-to-seed spread
    lines[3:3] = [
        "",
        f"Arms with a single seed ({', '.join(single)}): their intervals cover "
        "prompt and sampling noise only, not the spread between training seeds; read "
        "them as screening, not as a comparison.",
    ]
  md = "\n".join(lines)
  paths.makedirs(os.path.dirname(paths.resolve(cfg.results_md)))
  paths.write_text_atomic(cfg.results_md, md)
  plot_study(data, base_acc["overall"], cfg.curves_png)
  if cfg.get("readme"):
    table = [ln for ln in lines if ln.startswith("|")][: 2 + len([a for a in arms if a in finals])]
    notes = lines[2] + (f"\n\n{lines[4]}" if single else "")
    splice_readme(
        cfg.readme,
        "\n".join(table) + f"\n\n{notes}\n\nFull table and curves: " f"[`{cfg.results_md}`]({cfg.results_md}).\n",
    )
  return md


_BEGIN, _END = "<!-- study:begin (written by launch/study.py) -->", "<!-- study:end -->"


def splice_readme(path: str, block: str) -> None:
  """Replaces the text between the study markers of a README (which must hold both markers), so
  its results table is always the study's, never typed by hand."""
  with paths.open(path, encoding="utf-8") as fh:
    text = fh.read()
  i, j = text.find(_BEGIN), text.find(_END)
  if i < 0 or j < i:
    raise ValueError(f"{path}: no '{_BEGIN}' ... '{_END}' block to write the study's table into")
  paths.write_text_atomic(path, text[: i + len(_BEGIN)] + "\n" + block + text[j:])


def plot_study(data: dict[str, Any], base_overall: float, path: str) -> None:
  """Held-out overall vs rollout images and vs training wall time: a line per arm (seed mean),
  the band spanning the seeds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
  for i, (arm, runs) in enumerate(sorted(data["curves"].items())):
    color = f"C{i % 10}"
    per_seed = []
    for curve, secs, per_step in runs.values():
      pts = [(0, 0.0, base_overall)] + [
          (s * per_step, secs.get(s, np.nan) / 60, evaluate.tag_scores(e["tags"], e["strict"])["overall"])
          for s, e in curve
      ]
      per_seed.append(np.asarray(pts, np.float64))
    n = min(len(p) for p in per_seed)
    stack = np.stack([p[:n] for p in per_seed])
    for ax, xi in zip(axes, (0, 1)):
      x = np.nanmean(stack[:, :, xi], 0)
      ax.plot(
          x,
          stack[:, :, 2].mean(0),
          "o-",
          color=color,
          lw=2,
          label=f"{arm} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})",
      )
      if len(per_seed) > 1:
        ax.fill_between(x, stack[:, :, 2].min(0), stack[:, :, 2].max(0), color=color, alpha=0.15)
  for ax, label in zip(axes, ("rollout images", "training wall time (min, evaluations excluded)")):
    ax.axhline(base_overall, color="gray", ls="--", lw=1, label="base")
    ax.set_xlabel(label)
    ax.set_ylabel("held-out strict overall")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="best")
  fig.tight_layout()
  path = os.fspath(path)
  paths.makedirs(os.path.dirname(paths.resolve(path)))
  with paths.open(path, "wb") as f:  # a file object: savefig cannot write a URL itself
    fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png")
  plt.close(fig)
