"""ShapeEval (caption, codes, metadata) records: a TFDS builder written as ArrayRecord, read by grain.

TFDS 4.9.10 needs no TensorFlow for this path: ``GeneratorBasedBuilder`` with
``file_format='array_record'`` serialises examples with its own numpy example serializer, and
``builder.as_data_source()`` returns a random-access ``ArrayRecordDataSource`` that grain reads.

``build_world(data_dir)`` makes everything the ShapeEval world needs, once, under ``data_dir``:
  vq.npz            the patch codebook (k-means on freshly rendered scenes)
  tokenizer/        the word-level text tokenizer (AutoTokenizer.from_pretrained)
  shape_eval/...    the TFDS dataset: 'train' (train-split prompts) and 'eval' (held-out prompts)
Later calls reuse what exists; concurrent calls on one local data_dir (a study's workers starting
their seeds at once) take turns on ``.build.lock``, so the second reuses what the first built.
Each record: caption (str), codes (int32[N]) and meta (PromptMeta JSON). Train examples are
balanced over the tags of the split, each paired with a fresh scene.

Records depend on the scene generator, so the builder's version and config name change whenever
it does: ``GENERATOR_REVISION`` is bumped by hand with the generator (2: position scenes satisfy
GenEval's rule, see ``scenes.relation_holds``) and the name also carries a digest of the
world's geometry, so a data_dir built by an older generator or another world is rebuilt next to
the old records instead of being silently reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
from typing import Any, Callable

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from htgrpo_jax import paths
from htgrpo_jax.worlds.shapeeval import codebook as patch_vq
from htgrpo_jax.worlds.shapeeval import grammar, scenes, text_tokenizer
from htgrpo_jax.worlds.shapeeval.scenes import WorldConfig

CODEBOOK_FILE = "vq.npz"
TOKENIZER_DIR = "tokenizer"
# Revision of the scene generator that wrote the records (1: single-axis relations).
GENERATOR_REVISION = 2


def world_digest(world: WorldConfig) -> str:
  """8 hex digits identifying the world's geometry and the generator revision."""
  key = repr((GENERATOR_REVISION, dataclasses.astuple(world)))
  return hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class WorldAssets:
  """Paths and handles of a built world."""

  data_dir: str
  codebook: jax.Array  # float32[K, p*p*3]
  tokenizer: Any  # transformers tokenizer
  builder: tfds.core.DatasetBuilder


class ShapeEval(tfds.core.GeneratorBasedBuilder):
  """(caption, codes, meta) pairs of the ShapeEval world tokenised by the world's codebook."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial records.",
      "2.0.0": "Position scenes satisfy GenEval's relative-position rule with a margin.",
  }
  # No checksums file ships with this generated dataset; without this TFDS resolves the module's
  # resource path through ``importlib_resources``, which is not installed (and not needed).
  code_path = None

  def __init__(
      self,
      *,
      world: WorldConfig = WorldConfig(),
      num_train: int = 10000,
      num_eval: int = 1000,
      seed: int = 0,
      codebook: jax.Array | None = None,
      **kwargs,
  ):
    # Set before super().__init__, which may read the info.
    self._world, self._num = world, {"train": num_train, "eval": num_eval}
    self._seed, self._codebook = seed, codebook
    config = tfds.core.BuilderConfig(
        name=f"c{world.canvas}p{world.patch}{'s' if world.snap else 'u'}_n{num_train}_{num_eval}"
        f"_seed{seed}_g{GENERATOR_REVISION}w{world_digest(world)}"
    )
    super().__init__(config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                "caption": tfds.features.Text(),
                "codes": tfds.features.Tensor(shape=(self._world.num_tokens,), dtype=np.int32),
                "meta": tfds.features.Text(),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in ("train", "eval")}

  def _generate_examples(self, split: str):
    codebook = self._codebook
    if codebook is None:
      raise ValueError("ShapeEval: generating examples needs the codebook (pass codebook=)")
    rng = np.random.default_rng([self._seed, 0 if split == "train" else 1])
    ps = grammar.balanced_prompts(split, self._num[split], seed=self._seed, cfg=self._world)
    order = rng.permutation(len(ps))  # balanced_prompts cycles tags; interleave them randomly
    ps = [ps[i] for i in order]
    chunk = 1024  # encode in batches: one jitted call per chunk
    for s in range(0, len(ps), chunk):
      part = ps[s : s + chunk]
      imgs = scenes.render_batch([grammar.scene_for(p.meta, rng, self._world) for p in part], self._world)
      codes = np.asarray(patch_vq.encode(codebook, imgs))
      for j, (p, c) in enumerate(zip(part, codes)):
        yield s + j, {"caption": p.text, "codes": c, "meta": p.meta.to_json()}


def _fit_world_codebook(cfg: WorldConfig, seed: int, num_codes: int, num_images: int = 1000) -> jax.Array:
  rng = np.random.default_rng([seed, 7])
  sampled = [scenes.sample_scene(rng, [(None, None)] * int(rng.integers(1, 5)), cfg) for _ in range(num_images)]
  return patch_vq.fit_codebook(scenes.render_batch(sampled, cfg), num_codes, jax.random.PRNGKey(seed), patch=cfg.patch)


def build_world(
    data_dir: str | os.PathLike,
    cfg: WorldConfig = WorldConfig(),
    seed: int = 0,
    num_codes: int = 128,
    num_train: int = 10000,
    num_eval: int = 1000,
) -> WorldAssets:
  """Builds (or reuses) the codebook, tokenizer and TFDS dataset under ``data_dir`` (a local path
  or a URL). Processes building one local ``data_dir`` at once wait for each other (``BUILD_LOCK``);
  on a URL nothing can lock, so build it once before starting several."""
  data_dir = os.fspath(data_dir)
  paths.makedirs(data_dir, exist_ok=True)
  with _build_lock(data_dir):
    return _build_world(data_dir, cfg, seed, num_codes, num_train, num_eval)


BUILD_LOCK = ".build.lock"


@contextlib.contextmanager
def _build_lock(data_dir: str):
  """An exclusive ``flock`` on ``<data_dir>/.build.lock`` while the world is built: without it, two
  builders of one TFDS dataset race to rename their ``incomplete.*`` folder onto the same version
  folder and the second fails with FileExistsError (seen with ``launch/study.py --workers=2``)."""
  if paths.is_url(data_dir):
    yield
    return
  with open(os.path.join(data_dir, BUILD_LOCK), "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # blocks until the other builder is done; released on close
    yield


def _build_world(data_dir, cfg, seed, num_codes, num_train, num_eval) -> WorldAssets:
  cb_path = paths.join(data_dir, CODEBOOK_FILE)
  if paths.exists(cb_path):
    codebook = patch_vq.load(cb_path)
    if patch_vq.patch_size(codebook) != cfg.patch or codebook.shape[0] != num_codes:
      raise ValueError(
          f"{cb_path}: codebook {tuple(codebook.shape)} does not match "
          f"num_codes={num_codes}, patch={cfg.patch}; use another data_dir"
      )
  else:
    codebook = _fit_world_codebook(cfg, seed, num_codes)
    if paths.is_url(cb_path):
      patch_vq.save(cb_path, codebook)  # an object-store write is all-or-nothing
    else:
      tmp = cb_path + ".tmp.npz"
      patch_vq.save(tmp, codebook)
      os.replace(tmp, cb_path)  # atomic: a killed build never leaves a half-written codebook
  tok_dir = paths.join(data_dir, TOKENIZER_DIR)
  if not paths.exists(paths.join(tok_dir, "tokenizer.json")):
    text_tokenizer.save_tokenizer(text_tokenizer.build_tokenizer(grammar.vocabulary(cfg)), tok_dir)
  tokenizer = text_tokenizer.load_tokenizer(tok_dir)
  builder = ShapeEval(
      world=cfg,
      num_train=num_train,
      num_eval=num_eval,
      seed=seed,
      codebook=codebook,
      data_dir=paths.join(data_dir, "tfds"),
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          verify_ssl=False, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
      )
  )
  return WorldAssets(data_dir, codebook, tokenizer, builder)


def make_dataset(
    assets: WorldAssets,
    split: str,
    batch_size: int,
    seed: int = 0,
    max_len: int = 16,
    shuffle: bool = True,
    num_epochs: int | None = None,
    encode_prompts: Callable[[list[str]], np.ndarray] | None = None,
) -> grain.IterDataset:
  """A grain pipeline of batches.

  Each batch is a dict: ``prompt_tokens`` int32[B, L], ``codes`` int32[B, N], ``caption``
  (numpy str[B]) and ``meta`` (numpy str[B] of PromptMeta JSON). ``iter(ds)`` gives a
  ``grain.DatasetIterator`` whose ``get_state()`` / ``set_state()`` checkpoint the position.

  Args:
    assets: from ``build_world``.
    split: 'train' or 'eval'.
    batch_size: B (the last partial batch is dropped).
    seed: shuffle seed (a new permutation every epoch).
    max_len: L, prompt length.
    shuffle: shuffle examples.
    num_epochs: None repeats forever.
    encode_prompts: captions -> int32[b, L] (e.g. a model layout's ``encode_prompts``); default:
      the world tokenizer's [BOS] words [EOS] [PAD]... (``text_tokenizer.encode_prompts``).
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split {split!r} is not 'train' or 'eval'")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  source = assets.builder.as_data_source()[split]
  tok = assets.tokenizer

  def to_example(rec: dict[str, Any]) -> dict[str, Any]:
    caption = rec["caption"].decode() if isinstance(rec["caption"], bytes) else rec["caption"]
    meta = rec["meta"].decode() if isinstance(rec["meta"], bytes) else rec["meta"]
    tokens = (
        encode_prompts([caption])
        if encode_prompts is not None
        else text_tokenizer.encode_prompts(tok, [caption], max_len)
    )
    return {
        "prompt_tokens": np.asarray(tokens[0], np.int32),
        "codes": np.asarray(rec["codes"], np.int32),
        "caption": caption,
        "meta": meta,
    }

  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs).map(to_example).batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset()
