"""Evaluation folders of several arms and seeds against one base, with paired 95 % intervals
(``study.compare_evaluations``): for evaluations a study did not make itself, e.g. trained runs judged
with another sampler (docs/findings.md, section 19).

  python launch/compare_evals.py --base=runs/base_eval_t64/evals/base --ref=maskgrpo \\
      --arm=htgrpo:runs/t64_htgrpo_s0/evals/step60,runs/t64_htgrpo_s1/evals/step60 \\
      --arm=maskgrpo:runs/t64_maskgrpo_s0/evals/step60,runs/t64_maskgrpo_s1/evals/step60

Every folder must hold the base's prompts and samples per prompt (one evaluation key), as
launch/evaluate.py writes them with the same --samples_per_prompt. Prints a Markdown table.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_BASE = flags.DEFINE_string("base", None, "The base policy's evaluation folder (evals/<name>).", required=True)
_ARMS = flags.DEFINE_multi_string(
    "arm", None, "name:folder,folder,... (one folder per seed); repeatable.", required=True
)
_REF = flags.DEFINE_string("ref", None, "The arm the last column is against (default: none).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from htgrpo_jax import study  # noqa: PLC0415

  arms = {}
  for spec in _ARMS.value:
    name, sep, dirs = spec.partition(":")
    if not sep or not name or not dirs:
      raise app.UsageError(f"--arm={spec!r}: expected name:folder[,folder...]")
    arms[name] = dirs.split(",")
  print(study.compare_evaluations(_BASE.value, arms, ref=_REF.value), end="")


if __name__ == "__main__":
  app.run(main)
