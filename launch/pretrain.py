"""Pretrains the ShapeEval base policy, saves it with Orbax and evaluates it on held-out prompts.

  python launch/pretrain.py --config=configs/pretrain_shapes.py
  python launch/pretrain.py --config=configs/pretrain_shapes.py --config.num_steps=100 \
      --config.workdir=/tmp/base
  python launch/pretrain.py --config=configs/pretrain_shapes.py --eval_only   # re-evaluate a saved one

Writes {workdir}/params (Orbax), {workdir}/history.json, {workdir}/eval_table.md (per-tag
strict accuracy, GenEval's overall), {workdir}/eval_grid.png and {workdir}/eval.json (scores and
the fraction of prompts with mixed outcomes over eval.group_size samples).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from htgrpo_jax import evaluate, pretrain, runtime  # noqa: E402
from htgrpo_jax.models import policy  # noqa: E402
from htgrpo_jax.sampling import SamplerConfig, make_sampler  # noqa: E402
from htgrpo_jax.worlds.shapeeval import codebook as patch_vq  # noqa: E402
from htgrpo_jax.worlds.shapeeval import grammar  # noqa: E402
from htgrpo_jax.worlds.shapeeval.verifier import ShapeEvalReward  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain_shapes.py", "pretraining config")
_EVAL_ONLY = flags.DEFINE_boolean(
    "eval_only",
    False,
    "Only evaluate the policy already saved in " "{workdir}/params (table, grid, mixed-outcome fraction).",
)


def run_eval(cfg, out) -> dict:
  """Held-out table, grid and mixed-outcome fraction for a pretrained policy."""
  layout, model_cfg, params = out["layout"], out["model_cfg"], out["params"]
  scfg = SamplerConfig(
      num_steps=cfg.eval.num_steps,
      sketch_steps=max(1, cfg.eval.num_steps // 3),
      rule=cfg.eval.rule,
      cfg_scale=cfg.eval.cfg_scale,
      temperature=cfg.eval.temperature,
  )
  sampler = make_sampler(policy.make_canvas_logits_fn(model_cfg, layout), scfg, num_tokens=layout.num_image_tokens)
  world = pretrain.world_config(cfg)
  codebook = out["assets"].codebook
  decode = lambda codes: patch_vq.decode(codebook, codes)
  strict = ShapeEvalReward(world, mode="strict")
  score = lambda captions, images, meta: strict(captions, images, meta=meta)
  as_eval = lambda ps: [evaluate.EvalPrompt(p.text, p.meta.tag, p.meta.to_json()) for p in ps]
  key = jax.random.PRNGKey(cfg.seed + 1)
  ps = as_eval(grammar.balanced_prompts("eval", cfg.eval.num_prompts, seed=cfg.seed, cfg=world))
  res = evaluate.evaluate_policy(sampler, params, layout, decode, ps, key, score=score, batch_size=cfg.eval.batch_size)
  table = evaluate.tag_table(res["tags"], res["strict"], title="ShapeEval held-out")
  groups = as_eval(grammar.balanced_prompts("eval", cfg.eval.group_prompts, seed=cfg.seed + 1, cfg=world))
  gres = evaluate.evaluate_policy(
      sampler,
      params,
      layout,
      decode,
      groups,
      jax.random.fold_in(key, 1),
      score=score,
      samples_per_prompt=cfg.eval.group_size,
      batch_size=cfg.eval.batch_size,
  )
  outcomes = evaluate.group_outcomes(gres["strict"], cfg.eval.group_size)
  n = min(cfg.eval.grid_size, len(ps))
  caps = [f"{c}\n{'PASS' if s else 'fail'}" for c, s in zip(res["captions"][:n], res["strict"][:n])]
  os.makedirs(cfg.workdir, exist_ok=True)
  evaluate.image_grid(res["images"][:n], caps, os.path.join(cfg.workdir, "eval_grid.png"))
  with open(os.path.join(cfg.workdir, "eval_table.md"), "w") as f:
    f.write(table)
  summary = dict(
      scores=res["scores"],
      group_outcomes=outcomes,
      group_size=cfg.eval.group_size,
      group_prompts=cfg.eval.group_prompts,
      sampler=str(scfg),
  )
  with open(os.path.join(cfg.workdir, "eval.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return dict(summary, table=table)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  runtime.setup_runtime(cfg)  # compilation cache and log level (configs/pretrain_shapes.py)
  if _EVAL_ONLY.value:
    summary = run_eval(cfg, pretrain.load_pretrained(cfg))
    print(summary["table"])
    print("group outcomes at G=%d: %s" % (cfg.eval.group_size, summary["group_outcomes"]))
    return
  bar = {}

  def progress(it):
    bar["t"] = tqdm(it, total=cfg.num_steps, desc="pretrain", dynamic_ncols=True)
    return bar["t"]

  def log(step, m):
    bar["t"].set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.3f}")

  out = pretrain.pretrain(cfg, progress=progress, log=log)
  os.makedirs(cfg.workdir, exist_ok=True)
  with open(os.path.join(cfg.workdir, "history.json"), "w") as f:
    json.dump(out["history"], f)
  logging.info("trained %d steps in %.0f s; params at %s", out["steps_done"], out["seconds"], out["checkpoint"])
  print(
      f"trained {out['steps_done']} steps in {out['seconds']:.0f} s -> {out['checkpoint']} "
      f"(held-out masked-token loss {out['heldout_loss']:.4f})"
  )
  if cfg.eval.num_prompts > 0:
    summary = run_eval(cfg, out)
    print(summary["table"])
    print("group outcomes at G=%d: %s" % (cfg.eval.group_size, summary["group_outcomes"]))


if __name__ == "__main__":
  app.run(main)
