"""configs/mmada_geneval.py with its rewards on the accelerator: no reward server.

  python launch/train.py --config=configs/mmada_geneval_owl.py \
      --config.rewards.geneval.detector=/ckpt/owlv2-base-patch16-ensemble \
      --config.rewards.geneval.clip=/ckpt/clip-vit-large-patch14
  python launch/train.py --config=configs/mmada_geneval_owl.py:clipscore \
      --config.rewards.clipscore.checkpoint=/ckpt/clip-vit-large-patch14

The argument names the RL reward, '+'-separated (default ``geneval``):

* ``geneval``: the GenEval-style reward (``rewards.geneval_reward``, kind ``geneval_owl``): an
  OWLv2 detector (HF ``Owlv2ForObjectDetection`` dir) and GenEval's CLIP colour classifier (HF
  ``CLIPModel`` dir; GenEval uses ViT-L/14) under GenEval's rules, dense partial credit.
* ``clipscore``: CLIPScore (kind ``clipscore``) of the same CLIP checkpoint.
* ``geneval+clipscore``: their weighted sum (weights ``rewards.<name>.weight``), each normalised
  within its prompt group.

Evaluation always scores with the same detector and classifier under GenEval's strict 0/1 rules
(``world.score_reward``). The checkpoint options are shared by the RL rewards and the scorer (one
``ml_collections.FieldReference`` each), so one ``--config.rewards.geneval.detector=...`` sets both;
``--config.rewards.clipscore.checkpoint`` is the CLIP of the colour classifier too. Official GenEval
numbers come from a Mask2Former detector; OWLv2 is another detector, so these scores are
GenEval-style (docs/rewards_models.md).
"""

import os

import ml_collections

from htgrpo_jax.config_util import load_config_file  # config files load by path, not as a package

REWARDS = ("geneval", "clipscore")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  names = [n for n in (arg or "geneval").split("+") if n]
  unknown = [n for n in names if n not in REWARDS]
  if unknown or not names or len(set(names)) != len(names):
    raise ValueError(
        f"configs/mmada_geneval_owl.py: argument {arg!r}: expected '+'-separated names " f"from {REWARDS} (each once)"
    )
  c = load_config_file(os.path.join(os.path.dirname(__file__), "mmada_geneval.py"))
  c.workdir = "runs/mmada_geneval_owl"
  c.world.reward_url = ""  # no server: the rewards below run in the trainer
  detector = ml_collections.FieldReference("/ckpt/owlv2-base-patch16-ensemble")
  clip = ml_collections.FieldReference("/ckpt/clip-vit-large-patch14")
  owl = dict(kind="geneval_owl", detector=detector, clip=clip)
  c.world.score_reward = dict(owl, mode="strict")
  both = len(names) > 1
  if "geneval" in names:
    c.rewards.geneval = dict(owl, mode="dense", weight=1.0, group_norm=both)
  if "clipscore" in names:
    c.rewards.clipscore = dict(kind="clipscore", checkpoint=clip, scale=2.5, weight=1.0, group_norm=both)
  return c
