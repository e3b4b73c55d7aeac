"""A tiny masked-canvas policy and a trajectory-recording sampler, for the rl tests only.

The sampler is deliberately simple (not htgrpo_jax.sampling): every step it draws a token for every slot
from softmax(logits) and commits the ``per_step`` still-masked slots of highest ``priority`` (ties by index),
recording commit step, entropy and log-prob, as the rollout contract asks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from htgrpo_jax.rl.rollout import MASK, Rollout


class ToyPolicy(nn.Module):
  """Embeds prompt + canvas, mixes positions through one dense layer, per-slot codebook logits."""

  num_codes: int
  num_tokens: int
  vocab: int = 16
  dim: int = 16

  @nn.compact
  def __call__(self, prompt_tokens, canvas):
    b = canvas.shape[0]
    c = jnp.where(canvas < 0, self.num_codes, canvas)
    h = nn.Embed(self.num_codes + 1, self.dim, name="code_embed")(c)
    h = h + self.param("pos", nn.initializers.normal(0.5), (self.num_tokens, self.dim))
    h = h + nn.Embed(self.vocab, self.dim, name="prompt_embed")(prompt_tokens).mean(1, keepdims=True)
    ctx = nn.Dense(self.dim, name="mix")(h.reshape(b, -1))
    h = nn.gelu(nn.Dense(self.dim, name="hidden")(h + ctx[:, None]))
    return nn.Dense(self.num_codes, name="head")(h)


class NNXToyPolicy(nnx.Module):
  """The same computation as ToyPolicy, written in NNX."""

  def __init__(self, num_codes, num_tokens, *, vocab=16, dim=16, rngs: nnx.Rngs):
    self.num_codes, self.num_tokens, self.dim = num_codes, num_tokens, dim
    self.code_embed = nnx.Embed(num_codes + 1, dim, rngs=rngs)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (num_tokens, dim)) * 0.5)
    self.prompt_embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.mix = nnx.Linear(num_tokens * dim, dim, rngs=rngs)
    self.hidden = nnx.Linear(dim, dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_codes, rngs=rngs)

  def __call__(self, prompt_tokens, canvas):
    b = canvas.shape[0]
    h = self.code_embed(jnp.where(canvas < 0, self.num_codes, canvas)) + self.pos[...]
    h = h + self.prompt_embed(prompt_tokens).mean(1, keepdims=True)
    ctx = self.mix(h.reshape(b, -1))
    return self.head(nnx.gelu(self.hidden(h + ctx[:, None])))


def linen_logits_fn(model: nn.Module):
  return lambda params, prompt, canvas: model.apply({"params": params}, prompt, canvas)


@functools.partial(jax.jit, static_argnames=("logits_fn", "num_steps", "start", "stop"))
def sample(logits_fn, params, prompt_tokens, priority, key, *, num_steps, start=0, stop=None, init=None):
  """Samples canvases and records the trajectory.

  Runs steps [start, stop) (default: all T) from ``init`` (an earlier call's output; all-mask when
  None), so ``sample(stop=s)`` is a sketch and ``sample(start=s, init=repeated sketch)`` its paints.
  Step s draws with ``fold_in(key, s)``.

  Args:
    priority: float32[B, N]; higher commits earlier. N must be a multiple of num_steps.

  Returns:
    (image_tokens, commit_step, commit_entropy, commit_logp), [B, N] each.
  """
  b, n = priority.shape
  per_step = n // num_steps
  if init is None:
    init = (
        jnp.full((b, n), MASK, jnp.int32),
        jnp.full((b, n), -1, jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), jnp.float32),
    )
  canvas, step_rec, ent_rec, lp_rec = init
  for s in range(start, num_steps if stop is None else stop):
    logits = logits_fn(params, prompt_tokens, canvas).astype(jnp.float32)
    logp_all = jax.nn.log_softmax(logits)
    draw = jax.random.categorical(jax.random.fold_in(key, s), logits).astype(jnp.int32)
    ent = -(jnp.exp(logp_all) * logp_all).sum(-1)
    lp = jnp.take_along_axis(logp_all, draw[..., None], -1)[..., 0]
    score = jnp.where(canvas == MASK, priority, -jnp.inf)
    order = jnp.argsort(-score, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    commit = (rank < per_step) & (canvas == MASK)
    canvas = jnp.where(commit, draw, canvas)
    step_rec = jnp.where(commit, s, step_rec)
    ent_rec = jnp.where(commit, ent, ent_rec)
    lp_rec = jnp.where(commit, lp, lp_rec)
  return canvas, step_rec, ent_rec, lp_rec


def sample_branched(logits_fn, params, prompt_tokens, priority, key, *, num_steps, sketch_steps, paints):
  """Sketch on B rows (steps [0, sketch_steps)), repeat each sketch ``paints`` times (contiguous), paint.

  ``prompt_tokens``/``priority`` are per sketch row ([B, ...]); the result has B * paints rows, each
  sketch's paints contiguous (as ``htgrpo_jax.sampling``'s ``branch``).
  """
  k_sketch, k_paint = jax.random.split(key)
  sk = sample(logits_fn, params, prompt_tokens, priority, k_sketch, num_steps=num_steps, stop=sketch_steps)
  rep = lambda x: jnp.repeat(x, paints, axis=0)
  return sample(
      logits_fn,
      params,
      rep(prompt_tokens),
      rep(priority),
      k_paint,
      num_steps=num_steps,
      start=sketch_steps,
      init=tuple(map(rep, sk)),
  )


def random_rollout(rng: np.random.Generator, b: int, n: int, c: int, t: int, lp: int = 3) -> Rollout:
  """A Rollout with random (but contract-valid) contents."""
  return Rollout(
      prompt_tokens=jnp.asarray(rng.integers(0, 16, (b, lp)), jnp.int32),
      image_tokens=jnp.asarray(rng.integers(0, c, (b, n)), jnp.int32),
      commit_step=jnp.asarray(rng.integers(0, t, (b, n)), jnp.int32),
      commit_entropy=jnp.asarray(rng.uniform(0, np.log(c), (b, n)), jnp.float32),
      commit_logp=jnp.asarray(-rng.uniform(0, 3, (b, n)), jnp.float32),
      rewards=jnp.asarray(rng.normal(size=(b,)), jnp.float32),
  )


# Struct-stage gradient of one step on toy rollouts (shared by the branching and context tests).
TN, TC, TT, TSK = 16, 8, 4, 2  # 16 slots, 8 codes, 4 sampler steps, sketch phase = steps 0-1 (8 tokens)
TP, TG = 4, 4


def struct_grad_norm(m_rollout, m_cfg, seed=0, **cfg_kw):
  """Struct-stage grad norm of one step on toy rollouts: m_rollout = None samples the P*G images
  independently, otherwise P*m_rollout sketches each branched into G/m_rollout paints; the step uses
  num_sketches=m_cfg (and any other HTGRPOConfig fields in ``cfg_kw``)."""
  import optax
  from htgrpo_jax import rl

  model = ToyPolicy(TC, TN, dim=16)
  fn = linen_logits_fn(model)
  key = jax.random.key(seed)
  prompt_ids = np.arange(TP)
  prompts = jnp.asarray(np.repeat(prompt_ids, TG)[:, None] * np.ones((1, 2), int), jnp.int32)
  params = model.init(jax.random.fold_in(key, 0), prompts, jnp.zeros((TP * TG, TN), jnp.int32))["params"]
  priority = np.linspace(1.0, 0.0, TN, dtype=np.float32)
  if m_rollout is None:
    img, cs, ent, lp = sample(
        fn, params, prompts, jnp.asarray(np.tile(priority, (TP * TG, 1))), jax.random.fold_in(key, 1), num_steps=TT
    )
  else:
    sk_prompts = jnp.asarray(np.repeat(prompt_ids, m_rollout)[:, None] * np.ones((1, 2), int), jnp.int32)
    img, cs, ent, lp = sample_branched(
        fn,
        params,
        sk_prompts,
        jnp.asarray(np.tile(priority, (TP * m_rollout, 1))),
        jax.random.fold_in(key, 1),
        num_steps=TT,
        sketch_steps=TSK,
        paints=TG // m_rollout,
    )
  # A reward that depends on the sketch (code 0 on the first slots) and on the paint, plus noise.
  rewards = (
      (img[:, :4] == 0).mean(-1)
      + 0.5 * (img[:, 8:] == 1).mean(-1)
      + 0.1 * jax.random.normal(jax.random.fold_in(key, 2), (TP * TG,))
  ).astype(jnp.float32)
  ro = rl.Rollout(prompts, img, cs, ent, lp, rewards)
  cfg = rl.HTGRPOConfig(
      group_size=TG,
      num_sketches=m_cfg,
      num_sampler_steps=TT,
      n_global=0,
      n_struct=1,
      n_refine=0,
      sketch_fraction=TSK / TT,
      structure_ratio=0.25,
      update_schedule="constant",
      update_fraction=1.0,
      beta=0.0,
      **cfg_kw,
  )
  opt = optax.sgd(0.0)
  step = rl.make_train_step(fn, opt, cfg, donate=False)
  _, met = step(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(3))
  if m_rollout is not None:  # the branched rollout really shares the sketch inside each sketch group
    sk = np.asarray(cs) < TSK
    tok = np.asarray(img).reshape(TP * m_rollout, TG // m_rollout, TN)
    assert (tok == tok[:, :1]).all(axis=1)[sk.reshape(TP * m_rollout, TG // m_rollout, TN)[:, 0]].all()
  return float(met["struct"]["grad_norm"])
