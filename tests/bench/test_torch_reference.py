"""bench/torch_reference.py computes the JAX update's maths: what makes ``train_step.py --vs_torch`` honest.

From the same tiny LLaDA weights and rollout, the eager PyTorch update and ``rl.make_train_step`` must give the
same first-iteration gradient, the same per-iteration losses and pre-clip gradient norms over all K inner
iterations (which run on weights each update moved), and the same final weights, within fp32 tolerance.
"""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import torch_reference  # noqa: E402
import train_step as bench_train_step  # noqa: E402

from htgrpo_jax import rl  # noqa: E402
from tests.helpers.bench_args import tiny_bench_args  # noqa: E402
from htgrpo_jax.rl.loss import ht_grpo_loss, token_logp_entropy  # noqa: E402

ARGS = tiny_bench_args(layers=2)
LR = 1e-3


def _close(got, want, rtol, atol_frac, what):
  """Elementwise close, atol relative to the tensor's scale (gradients span decades)."""
  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(
          g, np.asarray(w), rtol=rtol, atol=atol_frac * float(np.abs(np.asarray(w)).max()) + 1e-12, err_msg=what
      ),
      got,
      want,
  )


@pytest.mark.parametrize(
    "estimator,beta,contexts",
    [
        pytest.param("htgrpo", 0.01, {}, marks=pytest.mark.slow),
        ("random_remask", 0.01, {}),
        pytest.param("htgrpo", 0.0, {}, marks=pytest.mark.slow),
        # replayed global/struct canvases (one old/ref pass each) beside the shared S-revealed refine one
        pytest.param("htgrpo", 0.01, dict(sketch_context="trajectory"), marks=pytest.mark.slow),
    ],
)
def test_torch_update_matches_jax_step(estimator, beta, contexts):
  torch.manual_seed(0)
  model_cfg, fn, params = bench_train_step.make_policy(ARGS)
  params = jax.tree.map(lambda p: p * 3.0, params)  # init_std 0.02 x 3: logits well away from uniform
  rollout = bench_train_step.make_rollout(ARGS, np.random.default_rng(1))
  config = dataclasses.replace(bench_train_step.make_config(ARGS, estimator, beta), **contexts)
  key = jax.random.key(5)

  opt = rl.make_optimizer(LR, clip_norm=1.0, weight_decay=0.01)
  step = rl.make_train_step(fn, opt, config, donate=False)
  state, met = step(rl.TrainState.create(params, opt, with_reference=beta > 0), rollout, key)

  inputs = torch_reference.prepare_update(config, rollout, key, step=0)
  text_vocab = bench_train_step.TEXT_VOCAB
  upd = torch_reference.build(
      model_cfg,
      params,
      config,
      prompt_len=ARGS.prompt_len,
      mask_id=text_vocab,
      offset=text_vocab + 1,
      codebook=ARGS.codebook,
      lr=LR,
  )
  grads0 = {}
  norms = []

  def hook(k, model):
    norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
    if k == 0:
      grads0.update(model.flax_grads())

  losses = upd.run(inputs, grad_hook=hook)

  # The first iteration's gradient from the JAX loss (old = ref = params: rho == 1, KL slope 0 at k == 0).
  canvas0 = jnp.asarray(inputs.canvases[0])
  mask0, adv0 = jnp.asarray(inputs.loss_masks[0]), jnp.asarray(inputs.token_adv[0])
  old0 = token_logp_entropy(fn(params, rollout.prompt_tokens, canvas0), rollout.image_tokens)[0]

  def loss0(p):
    logp, _ = token_logp_entropy(fn(p, rollout.prompt_tokens, canvas0), rollout.image_tokens)
    lsum, cnt, _ = ht_grpo_loss(logp, old0, old0, adv0, mask0, clip_eps=config.clip_eps, beta=beta)
    return lsum / jnp.maximum(cnt, 1.0)

  want_g0 = jax.grad(loss0)(params)
  assert float(np.abs(np.asarray(want_g0["block_0"]["q_proj"])).max()) > 0  # a real, non-zero gradient
  _close(grads0, want_g0, rtol=1e-3, atol_frac=1e-4, what="first-iteration gradient")

  np.testing.assert_allclose(losses, np.asarray(met["iter"]["loss"]), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(norms, np.asarray(met["iter"]["grad_norm"]), rtol=1e-4)
  assert len(set(np.round(losses, 6))) > 1  # the iterations saw different weights / canvases
  # Final weights after K clipped AdamW steps: within a small fraction of one step (lr) everywhere.
  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(g, np.asarray(w), rtol=0, atol=0.05 * LR),
      upd.model.flax_params(),
      state.params,
  )
  moved = max(
      float(np.abs(np.asarray(a) - np.asarray(b)).max())
      for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params))
  )
  assert moved > 0.5 * LR * config.num_iterations  # the weights did move K Adam steps
