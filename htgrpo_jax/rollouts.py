"""One RL step's rollout collection: prompts -> G images each -> pixels -> rewards -> ``Rollout``.

``collect_rollouts`` is the stage the trainer calls once per step:

  1. each prompt is repeated G times (rows prompt-major: a prompt's G images are contiguous);
  2. the jitted sampler draws them (``sample_groups``; with ``share_sketch`` M sketches per
     prompt, each branched into G / M paints), recording each token's commit step, entropy and
     log-prob;
  3. the task's VQ decoder turns the codes into pixels on device (``jit_decode``); the pixels
     leave the device once, for the reward;
  4. the reward runs on the host, once (process 0) and is shared with every process
     (``shared_rewards``), so a remote reward server sees one request per batch;
  5. the sample record and the rewards become the ``Rollout`` the compiled update takes.

``host_once`` is the same once-then-broadcast rule for any host-side computation (the evaluation's
judge / remote scorer).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import jax
import numpy as np

from htgrpo_jax import parallel
from htgrpo_jax.rewards.base import validate_rewards
from htgrpo_jax.contracts import Rollout
from htgrpo_jax.run_config import Plan

if TYPE_CHECKING:  # the Task type only (tasks imports the worlds, grain, the models)
  from htgrpo_jax import tasks

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# Host-side work done once, on process 0


def host_once(fn: Callable[[], T], encode: Callable[[T], bytes], decode: Callable[[bytes], T],
              what: str) -> T:
  """``fn()`` computed on process 0 only and given to every process.

  A reward server or judge must see one request per batch, not one per host; and every process
  must then hold bit-identical values (they feed the same compiled programs and loop decisions).
  On one process this is just ``fn()``.

  Args:
    fn: the host computation (any process may be asked; only process 0 runs it).
    encode, decode: its result to bytes and back (``decode(encode(x))`` must equal ``x``); in a
      multi-process run every process, process 0 included, returns ``decode(encode(fn()))``.
    what: names the computation in the error the other processes raise when it fails.

  Raises:
    whatever ``fn`` raised, on process 0; RuntimeError naming ``what`` on the others (instead of
    waiting forever for a result that will not come).
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  primary = parallel.is_primary()
  data, err = b"", None
  if primary:
    try:
      data = encode(fn())
    except Exception as e:  # noqa: BLE001 (re-raised below, after the others learnt of it)
      err = e
  head = np.asarray(multihost_utils.broadcast_one_to_all(
      np.asarray([err is None, len(data)], np.int32)))
  if not head[0]:
    if err is not None:
      raise err
    raise RuntimeError(f"{what} failed on process 0; see its log")
  n = int(head[1])
  buf = np.frombuffer(data, np.uint8) if primary else np.zeros((n,), np.uint8)
  if n:
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return decode(buf.tobytes())


def _json_bytes(obj: Any) -> bytes:
  return json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item") else str(v)).encode()


def _f32_bytes(x: np.ndarray) -> bytes:
  return np.ascontiguousarray(x, np.float32).tobytes()


def _f32_array(b: bytes) -> np.ndarray:
  return np.frombuffer(b, np.float32).copy()


def scorers_once(score: Callable[..., Any] | None, judge: Callable[..., Any] | None
                 ) -> tuple[Callable[..., np.ndarray] | None, Callable[..., list[dict]] | None]:
  """The evaluation's ``score`` (``(captions, images, metas) -> float32[B]``) and ``judge``
  (``-> [dict]``) run once on process 0 and shared (``host_once``); None stays None."""
  def once_score(captions, images, metas):
    return host_once(lambda: np.asarray(score(captions, images, metas), np.float32), _f32_bytes,
                     _f32_array, "the evaluation scorer")

  def once_judge(captions, images, metas):
    return host_once(lambda: list(judge(captions, images, metas)), _json_bytes, json.loads,
                     "the evaluation judge")
  return (None if score is None else once_score), (None if judge is None else once_judge)


def shared_rewards(reward: Callable[..., Any], captions: list[str], images: np.ndarray,
                   metas: list[str], batch: int) -> np.ndarray:
  """Validated float32[B] rewards, computed once (on process 0) and shared with every host so a
  remote reward server sees one request per batch."""
  name = getattr(reward, "name", getattr(reward, "__name__", "reward"))
  return host_once(lambda: validate_rewards(name, reward(captions, images, meta=metas), batch),
                   _f32_bytes, _f32_array, f"the reward {name!r}")


# ------------------------------------------------------------------------------------------------
# Device programs


def jit_decode(task: tasks.Task, mesh: jax.sharding.Mesh) -> Callable[[jax.Array], jax.Array]:
  """``codes int32[B, N] -> uint8[B, H, W, 3]`` on device: decoder params replicated (placed once),
  batch split over ``('data', 'fsdp')``."""
  rep = parallel.replicated(mesh)
  fn = jax.jit(task.decode, in_shardings=(rep, parallel.batch_sharding(mesh, 2)),
               out_shardings=parallel.batch_sharding(mesh, 4))
  return functools.partial(fn, jax.device_put(task.decode_params, rep))


def unconditional_rows(layout: Any, p: Plan, mesh: jax.sharding.Mesh) -> jax.Array:
  """The CFG (unconditional) prompt rows ``sample_groups`` takes, on the mesh: int32[P * M, Lp]
  with ``p.share_sketch`` (one per sketch), else int32[P * G, Lp] (one per image)."""
  rows = p.sketch_rows if p.share_sketch else p.batch_size
  return parallel.global_batch(layout.unconditional_prompts(rows), mesh)


def sample_groups(sampler, params: Any, prompts_np: np.ndarray, uncond: jax.Array, p: Plan,
                  key: jax.Array, mesh: jax.sharding.Mesh, *, prompts_b: jax.Array | None = None):
  """One step's P x G rollout images, rows prompt-major (each prompt's G images contiguous).

  ``p.share_sketch``: P x M sketches (each prompt repeated M = rl.num_sketches times, contiguously),
  each branched into G / M paints, so rows run (prompt, sketch, paint) as the hierarchical
  advantages expect. Otherwise G independent samples per prompt.

  Args:
    sampler: a ``sampling.Sampler``.
    params: policy params.
    prompts_np: int32[P, Lp] host prompt tokens.
    uncond: unconditional prompt rows on the mesh: int32[P * M, Lp] with share_sketch, else
      int32[P * G, Lp] (``unconditional_rows``).
    p: the plan; key: the step's rollout key; mesh: the mesh.
    prompts_b: optional int32[P * G, Lp] on the mesh (the prompts repeated G times), to reuse.

  Returns:
    The ``SampleRecord`` of the P * G images.
  """
  g = p.rl.group_size
  if p.share_sketch:
    m = p.rl.num_sketches
    k_sketch, k_paint = jax.random.split(key)
    sketch = sampler.sketch(params, parallel.global_batch(np.repeat(prompts_np, m, axis=0), mesh),
                            uncond, k_sketch)
    return sampler.paint(params, sampler.branch(sketch, g // m), k_paint)
  if prompts_b is None:
    prompts_b = parallel.global_batch(np.repeat(prompts_np, g, axis=0), mesh)
  return sampler.sample(params, prompts_b, uncond, key)


# ------------------------------------------------------------------------------------------------
# The stage


@dataclasses.dataclass(frozen=True)
class RolloutInfo:
  """What the host keeps of one step's rollouts (identical on every process).

  Attributes:
    rewards: float32[P * G] validated rewards, prompt-major.
    captions: the step's P prompt captions.
  """
  rewards: np.ndarray
  captions: list[str]

  @property
  def reward_mean(self) -> float:
    return float(self.rewards.mean())


def collect_rollouts(sampler, params: Any, batch: dict[str, np.ndarray], key: jax.Array, *,
                     p: Plan, uncond: jax.Array, decode: Callable[[jax.Array], jax.Array],
                     reward: Callable[..., Any], mesh: jax.sharding.Mesh
                     ) -> tuple[Rollout, RolloutInfo]:
  """Samples, decodes and rewards one step's P x G images.

  Args:
    sampler: the rollout ``sampling.Sampler``.
    params: the current policy params (on the mesh).
    batch: the data iterator's batch: ``prompt_tokens`` int32[P, Lp], ``caption`` [P] and ``meta``
      [P] (JSON strings), identical on every process.
    key: the step's rollout key.
    p: the plan; uncond: ``unconditional_rows(layout, p, mesh)``; decode: ``jit_decode(...)``;
    reward: the task's ``(captions, images, meta=[...]) -> float32[B]``; mesh: the mesh.

  Returns:
    (the ``Rollout`` on the mesh, B = P * G rows prompt-major; the host's ``RolloutInfo``).
  """
  g = p.rl.group_size
  prompts_np = np.asarray(batch["prompt_tokens"], np.int32)
  prompts_b = parallel.global_batch(np.repeat(prompts_np, g, axis=0), mesh)
  record = sample_groups(sampler, params, prompts_np, uncond, p, key, mesh, prompts_b=prompts_b)
  images = parallel.to_host(decode(record.image_tokens))
  captions = [str(c) for c in np.repeat(batch["caption"], g)]
  metas = [str(m) for m in np.repeat(batch["meta"], g)]
  rewards = shared_rewards(reward, captions, images, metas, p.batch_size)
  rollout = record.to_rollout(prompts_b, parallel.global_batch(rewards, mesh))
  return rollout, RolloutInfo(rewards=rewards, captions=[str(c) for c in batch["caption"]])
