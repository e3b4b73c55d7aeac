"""HT-GRPO configuration: one frozen dataclass, validated on construction, plus baseline presets.

Every choice the paper leaves open (docs/algorithm.md, "Open choices and where they live") is a field here so
it can be ablated. The presets reproduce the baselines through the same code path:

* ``htgrpo``    sketch-then-paint stages, entropy partition, two-level credit, fully-masked estimator
                scoring every candidate of its stage (``update_schedule='constant'``, fraction 1).
* ``maskgrpo``  MaskGRPO: one global stage, uniform credit, i.i.d. re-masking with the ramp
                r_k = min(m + (1 - m)(k + 1)/K, 0.999), loss on the re-masked tokens.
* ``tracegrpo`` TraceGRPO: one global stage, uniform credit, the recorded partial canvas before a
                sampled commit step, loss on the tokens committed at that step.
* ``uni``       UniGRPO: one global stage, uniform credit, random start mask ratio rising to 1.
"""

from __future__ import annotations

import dataclasses
import math

ESTIMATORS = ("htgrpo", "random_remask", "trajectory", "uni")
PARTITION_MODES = ("entropy", "step", "random")
SKETCH_CONTEXTS = ("all_mask", "trajectory")
REFINE_CONTEXTS = ("structure", "none", "trajectory")
UPDATE_SCHEDULES = ("constant", "ramp")
CREDIT_NORMALIZATIONS = ("image", "stage")
ESTIMATOR_GUIDANCE = ("none", "guided", "unguided_rollouts")

STAGE_GLOBAL, STAGE_STRUCT, STAGE_REFINE = 0, 1, 2
STAGE_NAMES = ("global", "struct", "refine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HTGRPOConfig:
  """Hyper-parameters of one HT-GRPO update (K inner iterations on one rollout batch).

  Defaults, measured (tests/rl, run with -s):

  * Partition: ``sketch_fraction=0.5`` with ``structure_ratio=0.125``. Under the cosine schedule the
    first half of the steps commits 1 - cos(pi/4) = 29 % of the N tokens, so S (12.5 % of N) is ~43 %
    of the sketch-phase candidates. On configs/geneval.py's sampler (emerge, cosine, T = 12, N = 64)
    |S| / |candidates| = 0.44 and S == candidates in 0.1 % of images; the earlier 0.25 gave 0.85 and
    27 % (S took nearly every candidate, so the partition modes could not differ). MMaDA's maskgit
    T = 15, N = 1024: 128 of 339 candidates (0.38). (``test_selectivity.py``.)
  * ``update_schedule='constant'``, ``update_fraction=1``: the 'htgrpo' estimator scores every
    global/struct iteration on one all-mask canvas, so a random update subset saves no compute and
    only adds noise: over 8 step keys on the toy policy the step's gradient (sum of the K = 6 at
    fixed params) has relative variance E|g - E g|^2 / |E g|^2 = 0.011 with MaskGRPO's ramp and 0
    (4e-15) with the full set, mean directions at cosine 0.9996 (``test_credit_and_schedule.py``).
    The MaskGRPO preset keeps its ramp.
  * ``credit_normalization='image'``: see below.

  Attributes:
    group_size: G images per prompt (contiguous in the batch); >= 2 (the group std needs two).
    num_sketches: M, sketches per prompt when the rollout branches each sketch into G / M paints
      (the trainer's ``sampler.share_sketch``). 1: the G images are independent samples and every
      token gets the image's group advantage. M >= 2 (must divide G, with G / M >= 2): each group
      is M sketches x G / M paints, contiguous (sketch-major); sketch-phase tokens (commit_step <
      ``sketch_steps``) get the sketch-level advantage (the sketch's mean paint reward against the
      prompt's M sketches) and paint-phase tokens the paint-level advantage (the image's reward
      against the other paints of its sketch). A shared sketch with one advantage per image (M = 1)
      cancels the sketch tokens' gradient exactly: the G images hold the same tokens, scored on the
      same canvas, with advantages that sum to 0.
    num_sampler_steps: T, the rollout sampler's step count (commit_step lies in [0, T)).
    n_global, n_struct, n_refine: iterations of each stage; K is their sum.
    num_iterations: K; None means n_global + n_struct + n_refine, otherwise must equal it.
    sketch_fraction: the sketch phase is the first ceil(sketch_fraction * T) sampler steps; only
      tokens committed then are structure candidates. In (0, 1].
    structure_ratio: |S| = ceil(structure_ratio * N) per image (fewer if fewer candidates). In (0, 1].
    partition_mode: 'entropy' (highest commit entropy first), 'step' (earliest first, entropy breaks
      ties) or 'random' (ablation).
    structure_weight, refine_weight: credit weight of S and R tokens (>= 0, not both 0).
    normalize_credit: rescale the credit weights to mean 1 (see ``credit_normalization``).
    credit_normalization: where the mean is 1. 'image' (default): over the image's N tokens. Each
      stage's loss is its own token mean, so the struct iterations carry w_S / mean(w) of the
      advantage (1.78x at the defaults: 2 / (0.125 * 2 + 0.875)) and the refine ones w_R / mean(w)
      (0.89x): a larger step on the structure stage, tied to |S| / N (metric '<stage>/credit').
      'stage': over each iteration's loss set, per image, so every stage has mean credit 1 and the
      step size of uniform credit; credit then only shifts weight between S and R where a loss set
      mixes them (the global stage) and the struct/refine emphasis comes from n_struct / n_refine.
      'image' is the default because it is the behaviour the HT-GRPO results were measured with and
      it learns the toy structure task (tests/rl/test_learning.py, 3 seeds) in 6/8/6 steps vs 7/8/7
      with 'stage' (uniform credit: 8/9/8). Uniform weights give credit exactly 1 under both (the
      baselines).
    estimator: 'htgrpo' | 'random_remask' | 'trajectory' | 'uni' (see estimators.py).
    sketch_context: the canvas of the global and struct iterations ('htgrpo' estimator only).
      'all_mask' (default): the prompt-only all-mask canvas, one shared forward. 'trajectory': per
      image and iteration, a sampler step group (``trajectory_group`` consecutive steps) is drawn
      uniformly among the groups that committed a candidate of the stage; the canvas holds the
      tokens committed before that group (what the sampler saw), the loss set the stage's candidates
      committed in it (TraceGRPO's context under HT-GRPO's stages, partition and credit). Old and
      reference passes then run per iteration.
    refine_context: the canvas of the refine iterations ('htgrpo' estimator only). 'structure'
      (default) reveals S; 'none' reveals nothing; 'trajectory' reveals S plus the R tokens committed
      before a step group drawn among the groups that committed an R token, and the loss set is the R
      tokens committed in that group.
    update_schedule: 'constant' draws update_fraction of the stage's candidates each iteration; 'ramp'
      draws r_k = min(m + (1 - m)(k + 1)/K, 0.999) (MaskGRPO's ramp over the global iteration index k).
    update_fraction: the constant fraction, in (0, 1].
    min_mask_rate: m of the ramp, in [0, 1).
    trajectory_group: consecutive sampler steps merged into one replay group (TraceRL's shrink), >= 1:
      the 'trajectory' estimator and the 'trajectory' sketch/refine contexts.
    replay_correction: iterations that replay a step group (the 'trajectory' estimator and contexts)
      draw one group per image among the n_b groups holding a candidate of the stage, so a candidate
      enters the loss with probability 1 / n_b and an image whose candidates sit in few groups weighs
      more. True weights image b's loss set by n_b (normalised to mean 1 over the iteration's loss
      tokens; ``estimators.replay_weights``): every candidate then counts once in expectation, as in
      the sum over the stage's candidates. Under HT-GRPO's struct stage (S: a few tokens spread over a
      varying number of steps) the uncorrected draw leans toward low-reward images (docs/findings.md,
      section 17). False (default): the draw as TraceGRPO makes it.
    estimator_guidance: which distribution the ratios score when rollouts use CFG / temperature.
      Consumed by whoever builds ``canvas_logits_fn`` (rl/ itself never sees a model): 'none' (the
      MaskGRPO-compatible default): the bare conditional policy, although the tokens were drawn from
      softmax(((1 + s) z_c - s z_u) / tau); 'guided': old, reference and current passes all score the
      sampler's guided, tempered logits (``sampling.guided_canvas_logits_fn``; twice the forward
      rows); 'unguided_rollouts': training rollouts at cfg_scale 0 (CFG for evaluation only). The
      step logs the gap either way (metric ``behaviour_gap``).
    clip_eps: PPO clip epsilon, > 0.
    beta: weight of the k3-KL to the reference policy, >= 0 (0 skips the reference pass).
    ptx_coef: weight of a supervised term in every inner iteration (InstructGPT's PPO-ptx), >= 0:
      the masked-token cross-entropy of ground-truth image tokens (``rl.supervised``; the base's
      pretraining objective) on a ``SupervisedBatch`` the caller passes to the step with the
      rollout. 0 (default): no term, and the step takes no batch.
    entropy_coef: weight of an entropy bonus on every loss token, >= 0: the token loss becomes
      pg + beta * kl - entropy_coef * H(pi_theta(. | canvas)), H the entropy (nats) over the codebook
      (PPO's entropy term). 0 (default): the entropy is a metric only, as in the paper.
    adv_eps: added to the group std, > 0.
    adv_std_ddof: 1 = unbiased group std (MaskGRPO, Tunix), 0 = population std.
    micro_batch_size: rows per gradient micro-batch; 0/None = whole batch. Must divide the batch.
  """

  group_size: int = 8
  num_sketches: int = 1
  num_sampler_steps: int = 12
  n_global: int = 2
  n_struct: int = 2
  n_refine: int = 2
  num_iterations: int | None = None
  sketch_fraction: float = 0.5
  structure_ratio: float = 0.125
  partition_mode: str = "entropy"
  structure_weight: float = 2.0
  refine_weight: float = 1.0
  normalize_credit: bool = True
  credit_normalization: str = "image"
  estimator: str = "htgrpo"
  estimator_guidance: str = "none"
  sketch_context: str = "all_mask"
  refine_context: str = "structure"
  update_schedule: str = "constant"
  update_fraction: float = 1.0
  min_mask_rate: float = 0.6
  trajectory_group: int = 1
  replay_correction: bool = False
  clip_eps: float = 0.2
  beta: float = 0.01
  ptx_coef: float = 0.0
  entropy_coef: float = 0.0
  adv_eps: float = 1e-5
  adv_std_ddof: int = 1
  micro_batch_size: int | None = None

  def __post_init__(self):
    def bad(field, constraint):
      raise ValueError(f"HTGRPOConfig.{field}={getattr(self, field)!r} {constraint}")

    for f in (
        "group_size",
        "num_sketches",
        "num_sampler_steps",
        "n_global",
        "n_struct",
        "n_refine",
        "trajectory_group",
        "adv_std_ddof",
    ):
      if not isinstance(getattr(self, f), int) or isinstance(getattr(self, f), bool):
        bad(f, "must be an int")
    if self.group_size < 2:
      bad("group_size", "must be >= 2 (the group std needs two samples)")
    if self.num_sketches < 1:
      bad("num_sketches", "must be >= 1")
    if self.group_size % self.num_sketches:
      bad("num_sketches", f"must divide group_size={self.group_size}")
    if self.num_sketches > 1 and self.group_size // self.num_sketches < 2:
      bad(
          "num_sketches",
          f"leaves group_size / num_sketches = {self.group_size // self.num_sketches} "
          "paint(s) per sketch; the paint-level advantage needs at least 2 paints per sketch",
      )
    if self.num_sampler_steps < 1:
      bad("num_sampler_steps", "must be >= 1")
    for f in ("n_global", "n_struct", "n_refine"):
      if getattr(self, f) < 0:
        bad(f, "must be >= 0")
    total = self.n_global + self.n_struct + self.n_refine
    if total < 1:
      bad("n_global", f"+n_struct+n_refine={total} must be >= 1")
    if self.num_iterations is None:
      object.__setattr__(self, "num_iterations", total)
    elif self.num_iterations != total:
      bad("num_iterations", f"must equal n_global+n_struct+n_refine={total}")
    for f in ("sketch_fraction", "structure_ratio", "update_fraction"):
      v = getattr(self, f)
      if not 0.0 < v <= 1.0:
        bad(f, "must lie in (0, 1]")
    if not 0.0 <= self.min_mask_rate < 1.0:
      bad("min_mask_rate", "must lie in [0, 1)")
    for f, allowed in (
        ("partition_mode", PARTITION_MODES),
        ("estimator", ESTIMATORS),
        ("sketch_context", SKETCH_CONTEXTS),
        ("refine_context", REFINE_CONTEXTS),
        ("update_schedule", UPDATE_SCHEDULES),
        ("credit_normalization", CREDIT_NORMALIZATIONS),
        ("estimator_guidance", ESTIMATOR_GUIDANCE),
    ):
      if getattr(self, f) not in allowed:
        bad(f, f"must be one of {allowed}")
    for f, other in (("sketch_context", "all_mask"), ("refine_context", "structure")):
      if getattr(self, f) == "trajectory" and self.estimator != "htgrpo":
        bad(
            f,
            f"applies to estimator='htgrpo' only (estimator={self.estimator!r} picks its own canvases; "
            f"set {f}={other!r} with it)",
        )
    for f in ("structure_weight", "refine_weight"):
      if not getattr(self, f) >= 0.0:
        bad(f, "must be >= 0")
    if self.structure_weight + self.refine_weight <= 0.0:
      bad("structure_weight", "and refine_weight must not both be 0")
    if self.trajectory_group < 1:
      bad("trajectory_group", "must be >= 1")
    if not isinstance(self.replay_correction, bool):
      bad("replay_correction", "must be a bool")
    if not self.clip_eps > 0.0:
      bad("clip_eps", "must be > 0")
    if not self.beta >= 0.0:
      bad("beta", "must be >= 0")
    if not (self.ptx_coef >= 0.0 and math.isfinite(self.ptx_coef)):
      bad("ptx_coef", "must be a finite number >= 0")
    if not (self.entropy_coef >= 0.0 and math.isfinite(self.entropy_coef)):
      bad("entropy_coef", "must be a finite number >= 0")
    if not self.adv_eps > 0.0:
      bad("adv_eps", "must be > 0")
    if self.adv_std_ddof not in (0, 1):
      bad("adv_std_ddof", "must be 0 or 1")
    if self.micro_batch_size is not None and (not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 0):
      bad("micro_batch_size", "must be None or an int >= 0")

  # ----- derived, static quantities (Python ints/floats, safe inside jit) -----
  @property
  def paints_per_sketch(self) -> int:
    """G / M: images painted from one sketch."""
    return self.group_size // self.num_sketches

  @property
  def sketch_steps(self) -> int:
    """Number of sampler steps in the sketch phase: ceil(sketch_fraction * T), at least 1."""
    return max(1, math.ceil(self.sketch_fraction * self.num_sampler_steps - 1e-9))

  def validate_batch(self, batch_size: int) -> None:
    """Raises ValueError unless group_size and micro_batch_size divide ``batch_size``."""
    if batch_size % self.group_size:
      raise ValueError(f"HTGRPOConfig.group_size={self.group_size} must divide the batch size {batch_size}")
    mb = self.micro_batch_size
    if mb and batch_size % mb:
      raise ValueError(f"HTGRPOConfig.micro_batch_size={mb} must divide the batch size {batch_size}")

  def micro_batches(self, batch_size: int) -> int:
    self.validate_batch(batch_size)
    return batch_size // self.micro_batch_size if self.micro_batch_size else 1


_UNIFORM = dict(structure_weight=1.0, refine_weight=1.0)
# The baselines: one global stage of K = 6 iterations, uniform credit, PPO clip 0.2, KL 0.01.
_ONE_STAGE = dict(n_global=6, n_struct=0, n_refine=0, clip_eps=0.2, beta=0.01, **_UNIFORM)

PRESETS: dict[str, dict] = {
    "htgrpo": dict(update_schedule="constant", update_fraction=1.0),
    "maskgrpo": dict(estimator="random_remask", update_schedule="ramp", min_mask_rate=0.6, **_ONE_STAGE),
    "tracegrpo": dict(estimator="trajectory", update_schedule="constant", update_fraction=1.0, **_ONE_STAGE),
    "uni": dict(estimator="uni", update_schedule="constant", update_fraction=1.0, **_ONE_STAGE),
}


def preset(name: str = "htgrpo", **overrides) -> HTGRPOConfig:
  """A validated config for a named preset with keyword overrides.

  Raises:
    ValueError: unknown preset name, or an override that breaks a constraint.
  """
  if name not in PRESETS:
    raise ValueError(f"preset name={name!r} must be one of {tuple(PRESETS)}")
  return HTGRPOConfig(**{**PRESETS[name], **overrides})
