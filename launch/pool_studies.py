"""Pools one arm's paired difference from another over several finished studies.

  python launch/pool_studies.py --studies=main,default_emerge,default_maskgit,base4k,long,bs32 \
      --arm=ht_traj_sketch --ref=htgrpo --out=docs/results_pooled.md

Each name is a variant of ``--study_config`` (``main`` is its default, ''); every study must have
finished runs of both arms. Prints and writes a Markdown table: each study's difference with its
95 % interval, the equal-weight mean over the studies and the mean without each study in turn
(``htgrpo_jax.study.pooled_difference``). Reads the studies' evaluations only; trains nothing.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_STUDY_CONFIG = flags.DEFINE_string("study_config", "configs/study.py", "The studies' config file.")
_STUDIES = flags.DEFINE_list(
    "studies", "main,default_emerge,default_maskgit,base4k,long,bs32", "Variants of --study_config ('main' = '')."
)
_ARM = flags.DEFINE_string("arm", "ht_traj_sketch", "The arm whose difference is pooled.")
_REF = flags.DEFINE_string("ref", "htgrpo", "The arm it is measured against.")
_N_BOOT = flags.DEFINE_integer("n_boot", 4000, "Bootstrap draws per study.")
_OUT = flags.DEFINE_string("out", "", "Write the Markdown here too ('' = print only).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from htgrpo_jax import paths, study
  from htgrpo_jax.tasks import load_config_file

  if len(set(_STUDIES.value)) != len(_STUDIES.value):
    raise app.UsageError(f"--studies={','.join(_STUDIES.value)}: a study is named twice")
  studies = {name: load_config_file(_STUDY_CONFIG.value, "" if name == "main" else name) for name in _STUDIES.value}
  result = study.pooled_difference(studies, _ARM.value, _REF.value, n_boot=_N_BOOT.value)
  command = (
      f"python launch/pool_studies.py --studies={','.join(_STUDIES.value)} --arm={_ARM.value} --ref={_REF.value}"
      + (f" --out={_OUT.value}" if _OUT.value else "")
  )
  md = study.pooled_report(result, _ARM.value, _REF.value, command=command)
  if _OUT.value:
    paths.write_text_atomic(_OUT.value, md)
  print(md)


if __name__ == "__main__":
  app.run(main)
