"""Held-out strict accuracy of one policy with and without the rollout cache, on the same prompts and keys.

  python bench/cache_accuracy.py --base=runs/study/base --data_dir=runs/shapeworld --out=/tmp/cache_acc
  python bench/cache_accuracy.py ... --prompts=192 --samples=2 --set=eval.sampler_cache.ratio=0.8

Builds the study's training config (``configs/study.py``: the frozen base policy's sampler and
evaluation settings), points it at ``--base`` (a base-policy checkpoint folder holding ``params/``) and
``--data_dir`` (the ShapeEval world assets), and scores the base twice through
``evaluate_run.evaluate_checkpoint``: ``eval.sampler_cache.enabled`` False, then True. Both use the
config's evaluation key (``eval.seed``), so the prompts and every uniform are the same; the cache is
the only difference. Prints both GenEval-style tables (95 % cluster-bootstrap intervals) and the
paired change of the cache with its interval (the same bootstrap draws applied to both).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from htgrpo_jax import evaluate, study, writer  # noqa: E402
from htgrpo_jax.config_util import load_config_file  # noqa: E402
from htgrpo_jax.evaluate_run import evaluate_checkpoint  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--base", required=True, help="base-policy checkpoint folder (holds params/)")
  ap.add_argument("--data_dir", required=True, help="ShapeEval world assets (world.data_dir)")
  ap.add_argument("--out", required=True, help="output folder (two evaluations are written under it)")
  ap.add_argument("--prompts", type=int, default=192, help="held-out prompts (eval.num_prompts)")
  ap.add_argument("--samples", type=int, default=1, help="images per prompt")
  ap.add_argument("--set", action="append", default=[], help="extra config override key=value")
  args = ap.parse_args(argv)

  cfg = load_config_file(str(ROOT / "configs" / "study.py"))
  c = study.train_config(cfg, None, cfg.base_seed, args.out)
  c.model.checkpoint = os.path.abspath(args.base)
  c.model.pretrain_if_missing = False
  c.world.data_dir = os.path.abspath(args.data_dir)
  c.eval.num_prompts = args.prompts
  c.progress = False
  for key, value in study.parse_overrides("; ".join(args.set)).items():
    study._set(c, key, value)

  res = {}
  for name, enabled in (("plain", False), ("cached", True)):
    c.eval.sampler_cache.enabled = enabled
    out_dir = os.path.join(args.out, name)
    t0 = time.perf_counter()
    r = evaluate_checkpoint(c, which="base", samples_per_prompt=args.samples, out_dir=out_dir, log=lambda s: None)
    print(f"== {name} (eval.sampler_cache.enabled={enabled}; {time.perf_counter() - t0:.0f} s " "with compilation)")
    print(r["table"])
    res[name] = writer.load_eval_samples(out_dir, "base")

  a, b = res["plain"], res["cached"]
  assert np.array_equal(a["prompt_index"], b["prompt_index"]) and np.array_equal(a["tags"], b["tags"])
  draws = evaluate.bootstrap_draws(a["tags"], a["prompt_index"], [a["strict"], b["strict"]])
  print(f"sampler cache: {dict(c.eval.sampler_cache)}; {args.prompts} prompts x {args.samples} samples")
  pa, pb = (evaluate.tag_scores(list(r["tags"]), r["strict"]) for r in (a, b))
  for tag, d in draws.items():
    lo, hi = evaluate.interval(d[1] - d[0])
    print(
        f"{tag:>14}: plain {pa[tag]:.3f}  cached {pb[tag]:.3f}  change {pb[tag] - pa[tag]:+.3f} "
        f"[{lo:+.3f}, {hi:+.3f}] (paired 95 % cluster bootstrap)"
    )
  print(f"samples scored alike: {np.mean(a['strict'] == b['strict']):.3f}")


if __name__ == "__main__":
  main()
