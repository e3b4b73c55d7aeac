"""One RL step's rollout collection: prompts -> G images each -> pixels -> rewards -> ``Rollout``.

``collect_rollouts`` is the stage the trainer calls once per step:

  1. each prompt is repeated G times (rows prompt-major: a prompt's G images are contiguous);
  2. the jitted sampler draws them (``sample_groups``; with ``share_sketch`` M sketches per
     prompt, each branched into G / M paints), recording each token's commit step, entropy and
     log-prob;
  3. the task's VQ decoder turns the codes into pixels on device (``jit_decode``); the pixels
     leave the device once, for the reward;
  4. the reward runs on the host, once (process 0) and is shared with every process
     (``shared_rewards``), so a remote reward server sees one request per batch (per part, below);
  5. the sample record and the rewards become the ``Rollout`` the compiled update takes.

With ``rollout.chunks`` = K > 1 the P prompts are sampled in K parts of P / K prompts (whole
groups; part k draws with ``fold_in(key, k)``), and the reward never stalls the accelerator: part
k + 1 is dispatched before part k's pixels are fetched, and part k is scored in a thread pool on
process 0 while the device samples (``ChunkScorer``: at most ``rollout.max_in_flight`` parts
scored at once, results kept in part order, a failure re-raised naming its reward). The weighted
sum and its per-group normalisation (``rewards.WeightedReward.combine``) run once all parts are
in, and that one result is what process 0 broadcasts (``host_once``), so every process still
holds identical rewards. ``max_in_flight=0`` scores each part right after it is sampled (no
overlap, the same numbers).

``host_once`` is the same once-then-broadcast rule for any host-side computation (the evaluation's
judge / remote scorer).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from htgrpo_jax import parallel
from htgrpo_jax.rewards.base import WeightedReward, as_weighted, validate_rewards
from htgrpo_jax.contracts import Rollout
from htgrpo_jax.run_config import Plan

if TYPE_CHECKING:  # the Task type only (tasks imports the worlds, grain, the models)
  from htgrpo_jax import tasks

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# Host-side work done once, on process 0


def host_once(fn: Callable[[], T], encode: Callable[[T], bytes], decode: Callable[[bytes], T], what: str) -> T:
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
  head = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray([err is None, len(data)], np.int32)))
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


def scorers_once(
    score: Callable[..., Any] | None, judge: Callable[..., Any] | None
) -> tuple[Callable[..., np.ndarray] | None, Callable[..., list[dict]] | None]:
  """The evaluation's ``score`` (``(captions, images, metas) -> float32[B]``) and ``judge``
  (``-> [dict]``) run once on process 0 and shared (``host_once``); None stays None."""

  def once_score(captions, images, metas):
    return host_once(
        lambda: np.asarray(score(captions, images, metas), np.float32), _f32_bytes, _f32_array, "the evaluation scorer"
    )

  def once_judge(captions, images, metas):
    return host_once(lambda: list(judge(captions, images, metas)), _json_bytes, json.loads, "the evaluation judge")

  return (None if score is None else once_score), (None if judge is None else once_judge)


def shared_rewards(
    reward: Callable[..., Any], captions: list[str], images: np.ndarray, metas: list[str], batch: int
) -> np.ndarray:
  """Validated float32[B] rewards, computed once (on process 0) and shared with every host so a
  remote reward server sees one request per batch."""
  name = getattr(reward, "name", getattr(reward, "__name__", "reward"))
  return host_once(
      lambda: validate_rewards(name, reward(captions, images, meta=metas), batch),
      _f32_bytes,
      _f32_array,
      f"the reward {name!r}",
  )


# ------------------------------------------------------------------------------------------------
# Device programs


def jit_decode(task: tasks.Task, mesh: jax.sharding.Mesh) -> Callable[[jax.Array], jax.Array]:
  """``codes int32[B, N] -> uint8[B, H, W, 3]`` on device: decoder params replicated (placed once),
  batch split over ``('data', 'fsdp')``."""
  rep = parallel.replicated(mesh)
  fn = jax.jit(
      task.decode, in_shardings=(rep, parallel.batch_sharding(mesh, 2)), out_shardings=parallel.batch_sharding(mesh, 4)
  )
  return functools.partial(fn, jax.device_put(task.decode_params, rep))


def unconditional_rows(layout: Any, p: Plan, mesh: jax.sharding.Mesh) -> jax.Array:
  """The CFG (unconditional) prompt rows ``sample_groups`` takes for one rollout part of
  P' = ``p.chunk_prompts`` prompts (P' = P when ``rollout.chunks`` is 1), on the mesh:
  int32[P' * M, Lp] with ``p.share_sketch`` (one per sketch), else int32[P' * G, Lp] (one per image)."""
  rows = p.chunk_prompts * (p.rl.num_sketches if p.share_sketch else p.rl.group_size)
  return parallel.global_batch(layout.unconditional_prompts(rows), mesh)


def sample_groups(
    sampler,
    params: Any,
    prompts_np: np.ndarray,
    uncond: jax.Array,
    p: Plan,
    key: jax.Array,
    mesh: jax.sharding.Mesh,
    *,
    prompts_b: jax.Array | None = None,
):
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
    sketch = sampler.sketch(params, parallel.global_batch(np.repeat(prompts_np, m, axis=0), mesh), uncond, k_sketch)
    return sampler.paint(params, sampler.branch(sketch, g // m), k_paint)
  if prompts_b is None:
    prompts_b = parallel.global_batch(np.repeat(prompts_np, g, axis=0), mesh)
  return sampler.sample(params, prompts_b, uncond, key)


# ------------------------------------------------------------------------------------------------
# The stage


class ChunkScorer:
  """Scores the parts of one batch in a thread pool, in order, at most ``max_in_flight`` at once.

  ``submit(rows, captions, images, metas)`` queues one part (on process 0 only: the others hold
  no futures); ``result()`` waits for every part and returns the batch's raw components
  ``{name: float32[B]}`` in part order. Waiting for a free slot never raises, so a failed part
  cannot make process 0 leave the step's collectives early: its error comes out of ``result``
  (which ``host_once`` runs), naming the reward and the rows. With ``max_in_flight=0`` each part
  is scored at ``submit`` (no thread, no overlap) and its error is kept for ``result`` the same way.
  """

  def __init__(self, reward: WeightedReward, max_in_flight: int, primary: bool = True):
    self.reward, self.max_in_flight, self.primary = reward, max_in_flight, primary
    self.parts: list[concurrent.futures.Future] = []
    self.pool = (
        concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix="reward")
        if max_in_flight and primary
        else None
    )

  def _score(self, rows: str, captions: list[str], images: np.ndarray, metas: list[str]) -> dict[str, np.ndarray]:
    return self.reward.components(captions, images, rows=rows, meta=metas)

  def submit(self, rows: str, captions: list[str], images: np.ndarray, metas: list[str]) -> None:
    if not self.primary:
      return
    if self.pool is None:
      f: concurrent.futures.Future = concurrent.futures.Future()
      try:
        f.set_result(self._score(rows, captions, images, metas))
      except Exception as e:  # noqa: BLE001 (raised by result(), inside host_once)
        f.set_exception(e)
      self.parts.append(f)
      return
    running = [f for f in self.parts if not f.done()]
    if len(running) >= self.max_in_flight:  # bounded: host memory and server load stay fixed
      concurrent.futures.wait(running[: len(running) - self.max_in_flight + 1])
    self.parts.append(self.pool.submit(self._score, rows, captions, images, metas))

  def result(self) -> dict[str, np.ndarray]:
    parts = [f.result() for f in self.parts]  # part order; the first failure is raised
    return {n: np.concatenate([p[n] for p in parts]) for n in self.reward.specs}

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=True)


def _encode_parts(names: tuple[str, ...]) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
  """(encode, decode) of ``(total float32[B], {name: float32[B]})`` for ``host_once``."""

  def encode(out):
    total, parts = out
    return np.stack([total] + [parts[n] for n in names]).astype(np.float32).tobytes()

  def decode(b):
    a = np.frombuffer(b, np.float32).reshape(len(names) + 1, -1).copy()
    return a[0], {n: a[i + 1] for i, n in enumerate(names)}

  return encode, decode


@functools.lru_cache(maxsize=8)
def _concat_program(mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """Concatenates the parts' ``SampleRecord``s along the batch, batch-sharded on ``mesh``."""
  return jax.jit(
      lambda *records: jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *records),
      out_shardings=parallel.batch_sharding(mesh, 2),
  )


@dataclasses.dataclass(frozen=True)
class RolloutInfo:
  """What the host keeps of one step's rollouts (identical on every process).

  Attributes:
    rewards: float32[P * G] validated rewards, prompt-major.
    captions: the step's P prompt captions.
    components: ``{name: float32[P * G]}`` each weighted reward's raw scores (before group
      normalisation and weights), logged as ``reward/<name>``; empty for a single plain reward.
  """

  rewards: np.ndarray
  captions: list[str]
  components: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def reward_mean(self) -> float:
    return float(self.rewards.mean())


def collect_rollouts(
    sampler,
    params: Any,
    batch: dict[str, np.ndarray],
    key: jax.Array,
    *,
    p: Plan,
    uncond: jax.Array,
    decode: Callable[[jax.Array], jax.Array],
    reward: Callable[..., Any],
    mesh: jax.sharding.Mesh,
) -> tuple[Rollout, RolloutInfo]:
  """Samples, decodes and rewards one step's P x G images (in ``p.rollout_chunks`` parts).

  Args:
    sampler: the rollout ``sampling.Sampler``.
    params: the current policy params (on the mesh).
    batch: the data iterator's batch: ``prompt_tokens`` int32[P, Lp], ``caption`` [P] and ``meta``
      [P] (JSON strings), identical on every process.
    key: the step's rollout key (part k of K > 1 draws with ``fold_in(key, k)``).
    p: the plan; uncond: ``unconditional_rows(layout, p, mesh)`` (one part's rows); decode:
      ``jit_decode(...)``; reward: the task's ``(captions, images, meta=[...]) -> float32[B]``, or
      a ``rewards.WeightedReward`` (scored per part, combined over the whole batch); mesh: the mesh.

  Returns:
    (the ``Rollout`` on the mesh, B = P * G rows prompt-major; the host's ``RolloutInfo``).

  Raises:
    the reward's error on process 0 (naming it), RuntimeError naming it on the other processes.
  """
  g, k = p.rl.group_size, p.rollout_chunks
  prompts_np = np.asarray(batch["prompt_tokens"], np.int32)
  captions = [str(c) for c in np.repeat(batch["caption"], g)]
  metas = [str(m) for m in np.repeat(batch["meta"], g)]
  prompts_b = parallel.global_batch(np.repeat(prompts_np, g, axis=0), mesh)
  combo = as_weighted(reward)
  per, rows = p.chunk_prompts, p.chunk_prompts * g
  overlap = k > 1 and p.reward_in_flight > 0
  scorer = ChunkScorer(combo, p.reward_in_flight if overlap else 0, primary=parallel.is_primary())
  records = []

  def launch(i: int):
    """Dispatches part i's sampler and decoder (asynchronously: nothing waits for the device)."""
    if k == 1:
      rec = sample_groups(sampler, params, prompts_np, uncond, p, key, mesh, prompts_b=prompts_b)
    else:
      rec = sample_groups(
          sampler, params, prompts_np[i * per : (i + 1) * per], uncond, p, jax.random.fold_in(key, i), mesh
      )
    records.append(rec)
    return decode(rec.image_tokens)

  def score(i: int, pixels: jax.Array) -> None:
    """Fetches part i's pixels (every process: a collective on several hosts) and queues them."""
    images = parallel.to_host(pixels)
    sl = slice(i * rows, (i + 1) * rows)
    scorer.submit(f"{sl.start}:{sl.stop}", captions[sl], images, metas[sl])

  try:
    if overlap:  # part i + 1 is on the device before part i is fetched and scored
      pending = launch(0)
      for i in range(1, k):
        nxt = launch(i)
        score(i - 1, pending)
        pending = nxt
      score(k - 1, pending)
    else:
      for i in range(k):
        score(i, launch(i))

    def combined():
      parts = scorer.result()
      return combo.combine(parts), parts

    names = tuple(combo.specs)
    encode, decode_parts = _encode_parts(names)
    rewards, parts = host_once(combined, encode, decode_parts, f"the reward {combo.name!r}")
  finally:
    scorer.close()
  record = records[0] if k == 1 else _concat_program(mesh)(*records)
  rollout = record.to_rollout(prompts_b, parallel.global_batch(rewards, mesh))
  return rollout, RolloutInfo(
      rewards=rewards,
      captions=[str(c) for c in batch["caption"]],
      components=parts if isinstance(reward, WeightedReward) else {},
  )
