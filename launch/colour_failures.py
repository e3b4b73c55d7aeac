"""How held-out colour prompts fail, per evaluation folder (htgrpo_jax/worlds/shapeeval/colour_failures.py).

  python launch/colour_failures.py \
      --eval_dirs=runs/study_default/base_eval/evals/base,runs/study_default/htgrpo/seed0/evals/step00060

Prints a Markdown table (each failure kind's share of the folder's colour samples); with --drawn,
the colours drawn instead of the asked one; with --prior, the colours each shape is drawn in on the
prompts that name no colour (their entropy, and the share in the held-out pairs' colours). A folder
is an evaluation's ``evals/<name>`` (``samples.jsonl`` and its PNGs), as training and
launch/evaluate.py write them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_DIRS = flags.DEFINE_list("eval_dirs", None, "Evaluation folders (evals/<name>), comma-separated.", required=True)
_DRAWN = flags.DEFINE_bool("drawn", False, "Also list the colours drawn on wrong_colour images.")
_PRIOR = flags.DEFINE_bool("prior", False, "Also tabulate each shape's colours on prompts that name no colour.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]} (folders go in --eval_dirs)")
  from htgrpo_jax.worlds.shapeeval import colour_failures  # noqa: PLC0415

  results = {d: colour_failures.tabulate(d) for d in _DIRS.value}
  print(colour_failures.markdown(results), end="")
  if _DRAWN.value:
    for d, t in results.items():
      print(f"\n{d}: colours drawn for the asked pair on wrong_colour images")
      for pair, colours in t["drawn"].items():
        print(f"  {pair}: " + ", ".join(f"{c} {n}" for c, n in sorted(colours.items(), key=lambda kv: -kv[1])))
  if _PRIOR.value:
    priors = {d: colour_failures.colour_prior(d) for d in _DIRS.value}
    print("\n" + colour_failures.prior_markdown(priors))
    for d in _DIRS.value:
      hits, total = colour_failures.drawn_in_the_mode(results[d], priors[d])
      print(f"{d}: {hits} of {total} wrong-colour objects are in their shape's most drawn unasked colour")
      share = colour_failures.two_colour_share(d)
      print(f"{d}: {share:.3f} of the images of prompts naming no colour draw two colours touching")


if __name__ == "__main__":
  app.run(main)
