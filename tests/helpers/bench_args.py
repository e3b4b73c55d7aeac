"""The tiny model and update size the bench tests run ``bench/train_step.py``'s builders at."""

import types


def tiny_bench_args(**over) -> types.SimpleNamespace:
  """``bench/train_step.py``'s command-line namespace at a size a test compiles in seconds."""
  args = dict(
      d=32,
      layers=1,
      heads=2,
      mlp=64,
      tokens=16,
      codebook=16,
      prompt_len=4,
      batch=8,
      group=4,
      sampler_steps=4,
      stages=(1, 1, 1),
      micro_batch_size=0,
  )
  return types.SimpleNamespace(**{**args, **over})
