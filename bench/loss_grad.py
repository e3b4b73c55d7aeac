"""One inner iteration's forward + backward (the update's dominant cost): JAX vs eager PyTorch, one run.

  python bench/loss_grad.py [--threads=1 --repeats=5]
  XLA_FLAGS=--xla_cpu_use_onednn=true python bench/loss_grad.py     # try an XLA:CPU option
  python bench/loss_grad.py --profile                               # per-op time of the JAX fwd+bwd

The shapes-size model of ``bench/train_step.py`` (d 128, 4 layers, B 64, 16 + 64 tokens, C 128), the loss of
the first 'random_remask' iteration (PPO-clip + k3-KL over the loss set, token mean). Times, interleaved,
medians: ``jax.grad`` of the loss with the projections as flat 2-D matmuls (the package's form), the same
with the einsum form (``jnp.tensordot``, before docs/performance.md), the PyTorch reference's backward
(``bench/torch_reference.py``) and both forwards. Cores as in ``train_step.py`` (``--threads=N``: the process
pinned to N CPUs and XLA's and PyTorch's intra-op pools set to N, ``bench/cores.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # XLA reads its flags once, when the backend starts: set them before importing JAX
  import cores  # bench/cores.py

  cores.limit(cores.requested())
  if "--profile" in sys.argv:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_xprof_traceme=true"

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step as ts  # noqa: E402
from htgrpo_jax.models import llada  # noqa: E402
from htgrpo_jax.rl.loss import ht_grpo_loss, token_logp_entropy  # noqa: E402

SHAPES = argparse.Namespace(**ts.SHAPES, micro_batch_size=0)


def profile(grad, params, calls=3):
  """Prints the summed time of each HLO op kind and the top loop fusions of ``grad(params)``."""
  from jax._src.lib import _profile_data  # noqa: PLC0415

  compiled = grad.lower(params).compile()
  kinds = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) (\w[\w\-]*)\(", line)
    if m:
      k = re.search(r"kind=(\w+)", line)
      kinds[m.group(1)] = (m.group(3) + (f":{k.group(1)}" if k else ""), m.group(2)[:40])
  jax.block_until_ready(compiled(params))
  logdir = tempfile.mkdtemp(prefix="loss_grad_")
  with jax.profiler.trace(logdir):
    for _ in range(calls):
      jax.block_until_ready(compiled(params))
  data = _profile_data.ProfileData.from_file(str(next(Path(logdir).rglob("*.xplane.pb"))))
  tot = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in kinds:
          tot[ev.name] += ev.duration_ns / 1e9 / calls
  total = sum(tot.values())
  by_kind = collections.Counter()
  for name, s in tot.items():
    by_kind[kinds[name][0]] += s
  print(f"op time per call {total:.3f} s")
  for kind, s in by_kind.most_common(8):
    print(f"  {kind:20s} {s:.3f} s  {100 * s / total:5.1f}%")
  print("top loop fusions:")
  for name, s in [(n, s) for n, s in tot.most_common() if kinds[n][0] == "fusion:kLoop"][:12]:
    print(f"  {name:32s} {s:.4f} s  {100 * s / total:5.1f}%  {kinds[name][1]}")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--threads", type=int, default=0)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--profile", action="store_true", help="profile the JAX fwd+bwd instead of timing")
  args = ap.parse_args()
  cfg, fn, params = ts.make_policy(SHAPES)
  ro = ts.make_rollout(SHAPES, np.random.default_rng(0))
  config = ts.make_config(SHAPES, "random_remask", 0.01)
  import torch_reference as tr  # noqa: PLC0415

  inp = tr.prepare_update(config, ro, jax.random.key(0))
  canvas, mask, adv = map(jnp.asarray, (inp.canvases[0], inp.loss_masks[0], inp.token_adv[0]))
  old = token_logp_entropy(fn(params, ro.prompt_tokens, canvas), ro.image_tokens)[0]

  def make_grad():
    def loss(p):
      logp, ent = token_logp_entropy(fn(p, ro.prompt_tokens, canvas), ro.image_tokens)
      s, c, m = ht_grpo_loss(logp, old, old, adv, mask, clip_eps=config.clip_eps, beta=config.beta, entropy=ent)
      return s / c, m

    return jax.jit(jax.grad(loss, has_aux=True))

  if args.profile:
    profile(make_grad(), params)
    return

  import torch  # noqa: PLC0415

  threads = args.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  flat = llada.flat_matmul
  runs = {"jax_flat": make_grad(), "jax_einsum": make_grad()}
  jax.block_until_ready(runs["jax_flat"](params))  # traced with the package's flat_matmul
  llada.flat_matmul = lambda x, kernel, n_in: jnp.tensordot(x, kernel, axes=n_in)
  jax.block_until_ready(runs["jax_einsum"](params))
  llada.flat_matmul = flat
  fwd = jax.jit(fn)
  jax.block_until_ready(fwd(params, ro.prompt_tokens, canvas))

  model = tr.TorchLLaDA(
      cfg, prompt_len=SHAPES.prompt_len, mask_id=ts.TEXT_VOCAB, offset=ts.TEXT_VOCAB + 1, codebook=SHAPES.codebook
  ).load_flax(params)
  t = lambda a, dt=np.int64: torch.from_numpy(np.array(a, dt))
  prompt, cv, tok = t(inp.prompt_tokens), t(inp.canvases[0]), t(inp.image_tokens)
  tm, ta, to = t(inp.loss_masks[0], np.float32), t(inp.token_adv[0], np.float32), t(old, np.float32)

  def torch_grad():
    for p in model.parameters():
      p.grad = None
    logp, _ = tr._token_logp(model(prompt, cv), tok)
    rho = torch.exp(logp - to)
    pg = -torch.minimum(rho * ta, rho.clamp(1 - config.clip_eps, 1 + config.clip_eps) * ta)
    d = to - logp
    ((pg + config.beta * (torch.exp(d) - d - 1)) * tm).sum().div(tm.sum()).backward()

  def torch_fwd():
    with torch.no_grad():
      model(prompt, cv)

  torch_grad()
  calls = {
      **{k: (lambda g=g: jax.block_until_ready(g(params))) for k, g in runs.items()},
      "torch": torch_grad,
      "jax_fwd": lambda: jax.block_until_ready(fwd(params, ro.prompt_tokens, canvas)),
      "torch_fwd": torch_fwd,
  }
  times = {k: [] for k in calls}
  for _ in range(args.repeats):
    for k, f in calls.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"{threads} intra-op thread(s) each; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
  for k, v in med.items():
    print(f"  {k:11s} (median/{args.repeats}) {v:.4f} s")
  print(
      f"fwd+bwd speed vs torch: flat {med['torch'] / med['jax_flat']:.3f}x   "
      f"einsum {med['torch'] / med['jax_einsum']:.3f}x   "
      f"(flat/einsum {med['jax_einsum'] / med['jax_flat']:.3f}x)"
  )
  print(f"fwd speed vs torch: {med['torch_fwd'] / med['jax_fwd']:.3f}x")


if __name__ == "__main__":
  main()
