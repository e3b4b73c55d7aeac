"""How different each prompt's samples are, per evaluation folder (``evaluate.sample_diversity``).

  python launch/diversity.py \
      --eval_dirs=runs/study_default_cpu500/htgrpo/seed1/evals/step00500,runs/study_default_cpu500/maskgrpo/seed1/evals/step00500

Prints a Markdown table: the folder's strict accuracy, its sample diversity (the share of pixels that
differ between two samples of one prompt, averaged over pairs and prompts; 0 = the same picture every
time) and the share of prompts whose samples are all one picture. A folder is an evaluation's
``evals/<name>`` (``samples.jsonl`` and its PNGs), as training and launch/evaluate.py write them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_DIRS = flags.DEFINE_list("eval_dirs", None, "Evaluation folders (evals/<name>), comma-separated.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]} (folders go in --eval_dirs)")
  import numpy as np  # noqa: PLC0415

  from htgrpo_jax import evaluate  # noqa: PLC0415

  print("| evaluation | samples | strict | sample diversity | prompts drawn identically |")
  print("|---|---:|---:|---:|---:|")
  for d in _DIRS.value:
    r = evaluate.read_samples(d)
    div = evaluate.sample_diversity(r["images"], r["prompt_index"])
    groups = [r["images"][r["prompt_index"] == p] for p in np.unique(r["prompt_index"])]
    same = [len(np.unique(g.reshape(len(g), -1), axis=0)) == 1 for g in groups if len(g) > 1]
    div_s, same_s = ("-", "-") if div is None else (f"{div:.3f}", f"{np.mean(same):.3f}")
    print(f"| `{d}` | {len(r['strict'])} | {r['strict'].mean():.3f} | {div_s} | {same_s} |")


if __name__ == "__main__":
  app.run(main)
