"""One process of a multi-process trainer test: ``python -m tests.helpers.train_process ROOT NAME
[key=value ...]`` runs ``trainer.train`` on ``tiny_config(ROOT, NAME)`` with the dotted keys set
(values parsed as Python literals) and prints, last, one ``RESULT {json}`` line: the process index,
the step reached, the final params' checksums (sharding-independent, ``checkpoint.leaf_checksums``)
and every file this process opened for writing under the workdir outside ``checkpoints/`` (Orbax
writes there from every process by design; everything else is process 0's).

Started by ``tests.helpers.multiprocess`` (the coordinator environment set), so the trainer joins
the other processes through ``jax.distributed``.
"""
import ast
import builtins
import json
import os
import pathlib
import sys


def _watch_writes(workdir: str) -> list[str]:
  """Records the paths under ``workdir`` (but ``checkpoints/``) this process opens to write."""
  seen: list[str] = []
  real_open = builtins.open
  root = os.path.abspath(workdir) + os.sep
  skip = os.path.join(root, "checkpoints") + os.sep

  def open_(file, mode="r", *a, **k):
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
      path = os.path.abspath(os.fspath(file))
      if path.startswith(root) and not path.startswith(skip):
        seen.append(os.path.relpath(path, root))
    return real_open(file, mode, *a, **k)
  builtins.open = open_
  return seen


def main(argv: list[str]) -> None:
  root, name, *over = argv
  from tests.helpers.configs import tiny_config
  cfg = tiny_config(pathlib.Path(root), name, **{
      k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in over)})
  writes = _watch_writes(cfg.workdir)
  from htgrpo_jax import checkpoint, trainer
  out = trainer.train(cfg)  # log=print: process 0's lines only
  import jax
  sums = checkpoint.leaf_checksums(out["params"])
  print("RESULT " + json.dumps(dict(process=jax.process_index(), processes=jax.process_count(),
                                    step=out["step"], checksums=sums, writes=sorted(set(writes)),
                                    evals={str(k): v for k, v in out["evals"].items()})),
        flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
