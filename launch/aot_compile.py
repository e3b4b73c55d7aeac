"""AOT pre-flight: compiles the sampler and the HT-GRPO train step for a TPU slice, on any CPU box.

  python launch/aot_compile.py --model=mmada_8b --topology=v5p:4x4x4 --mesh=1,16,4 \
      --batch=128 --micro_batch=2 --remat=full --what=sampler,train_step
  python launch/aot_compile.py --config=configs/mmada_geneval.py --topology=v5p:4x4x4

Nothing is allocated and no TPU is needed: libtpu describes the slice and XLA:TPU compiles the real
sharded programs on abstract inputs. Prints per-device memory (arguments + outputs - donated aliases
+ temps + code) against the chip's HBM, analytic model TFLOPs per device per call, XLA's own FLOP
count (which counts loop bodies once) and the compile time, as Markdown table rows.

With ``--config`` the model, layout, RL / sampler settings, batch (prompts_per_step x group_size),
mesh and micro-batch come from the training config; flags given explicitly on the command line
override them. Libtpu prints harmless TPU_WORKER_HOSTNAMES warnings on a CPU machine.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; the TPU is only described
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", "mmada_8b", "LLaDA preset: mmada_8b | lumina_dimoo_8b | tiny | shapes.")
_LAYOUT = flags.DEFINE_string("layout", None, "mmada | dimoo | embedded (default: the model's own).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Local tokenizer dir (default: a scratch one; "
                                 "shapes do not depend on it).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "DiMOO layout image side in pixels.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4", "libtpu topology, e.g. v5p:4x4x4 (64 chips), v5e:16x16.")
_MESH = flags.DEFINE_string("mesh", "1,16,4", "data,fsdp,tensor sizes; one may be -1 (= the chips left).")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per RL step (prompts x group_size).")
_MICRO_BATCH = flags.DEFINE_integer("micro_batch", 2, "Gradient micro-batch rows PER DEVICE (0 = whole batch).")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots", "dots_no_batch"], "Per-block remat policy.")
_SCAN = flags.DEFINE_boolean("scan_layers", True, "Scan the blocks (compile time flat in depth).")
_N_LAYERS = flags.DEFINE_integer("n_layers", 0, "Override the depth (0 = preset); for quick checks.")
_WHAT = flags.DEFINE_list("what", ["sampler", "train_step"], "Programs: sampler, sketch, paint, train_step.")
_RL_PRESET = flags.DEFINE_string("rl_preset", "htgrpo", "HT-GRPO preset (htgrpo, maskgrpo, tracegrpo, uni).")
_GROUP = flags.DEFINE_integer("group_size", 8, "G images per prompt.")
_STAGES = flags.DEFINE_list("stages", None, "n_global,n_struct,n_refine (default: the preset's).")
_BETA = flags.DEFINE_float("beta", None, "KL weight (0 drops the reference params); default: the preset's.")
_REF_DTYPE = flags.DEFINE_enum("ref_dtype", "float32", ["float32", "bfloat16"], "Reference params dtype.")
_STEPS = flags.DEFINE_integer("sampler_steps", 15, "Sampler steps T.")
_SKETCH = flags.DEFINE_integer("sketch_steps", 0, "Sampler sketch steps (0 = ceil(sketch_fraction * T)).")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 3.5, "CFG scale (0 = no unconditional pass).")
_SHARE = flags.DEFINE_boolean("share_sketch", False, "Sketch on prompts, paint on prompts x G.")
_CONFIG = flags.DEFINE_string("config", None, "Optional training config file[:arg] (ml_collections); "
                              "explicit flags override it.")


def _explicit(flag) -> bool:
  return flags.FLAGS[flag.name].present


def _pick(flag, from_config):
  """The flag's value when given on the command line, else the config's (when any), else the default."""
  if _explicit(flag) or from_config is None:
    return flag.value
  return from_config


def _mesh_sizes(text: str, n_chips: int) -> tuple[int, int, int]:
  try:
    sizes = [int(s) for s in text.split(",")]
  except ValueError:
    raise ValueError(f"mesh={text!r}: expected three comma-separated ints data,fsdp,tensor") from None
  if len(sizes) != 3:
    raise ValueError(f"mesh={text!r}: expected three sizes data,fsdp,tensor")
  if sizes.count(-1) == 1:
    known = -int(__import__("numpy").prod(sizes))
    if known <= 0 or n_chips % known:
      raise ValueError(f"mesh={text!r}: {n_chips} chips do not divide by the given sizes")
    sizes[sizes.index(-1)] = n_chips // known
  return tuple(sizes)


def build_setup():
  """The ``aot.Setup`` from the flags (and the optional config)."""
  from htgrpo_jax import aot, rl
  from htgrpo_jax.sampling import SamplerConfig

  cfg_model = cfg_layout = cfg_mesh = cfg_batch = cfg_mb_global = cfg_image = None
  cfg_overrides = {}
  plan = None
  if _CONFIG.value:
    from htgrpo_jax import tasks, trainer
    path, _, arg = _CONFIG.value.partition(":")
    config = tasks.load_config_file(path, arg or None)
    plan = trainer.plan(config)
    cfg_model, cfg_layout = config.model.preset, config.model.get("layout")
    cfg_image = config.model.get("image_size")
    cfg_overrides = dict(config.model.get("overrides") or {})  # the config's model sizes too
    m = config.mesh
    cfg_mesh = f"{m.data},{m.fsdp},{m.tensor}"
    cfg_batch, cfg_mb_global = plan.batch_size, plan.rl.micro_batch_size

  model = _pick(_MODEL, cfg_model)
  layout_kind = _LAYOUT.value if _LAYOUT.value else (cfg_layout if cfg_layout in aot.LAYOUT_KINDS else None)
  overrides = dict(cfg_overrides, remat=_pick(_REMAT, cfg_overrides.get("remat")),
                   scan_layers=_pick(_SCAN, cfg_overrides.get("scan_layers")))
  if _N_LAYERS.value:
    overrides["n_layers"] = _N_LAYERS.value
  model_cfg, layout = aot.build_model(model, layout=layout_kind, tokenizer=_TOKENIZER.value,
                                      image_size=_pick(_IMAGE_SIZE, cfg_image), **overrides)

  n_chips = aot.topology_devices(_TOPOLOGY.value).size
  mesh = _mesh_sizes(_pick(_MESH, cfg_mesh), n_chips)
  batch_ways = mesh[0] * mesh[1]

  if plan is not None and not any(_explicit(f) for f in (_RL_PRESET, _GROUP, _STAGES, _BETA, _STEPS,
                                                           _SKETCH, _CFG_SCALE)):
    rl_cfg, s_cfg = plan.rl, plan.sampler
    share = bool(config.sampler.get("share_sketch", False))
  else:
    over = {}
    if _STAGES.value:
      over.update(zip(("n_global", "n_struct", "n_refine"), (int(s) for s in _STAGES.value)))
    if _BETA.value is not None:
      over["beta"] = _BETA.value
    rl_cfg = rl.preset(_RL_PRESET.value, group_size=_GROUP.value, num_sampler_steps=_STEPS.value, **over)
    s_cfg = SamplerConfig(num_steps=_STEPS.value, sketch_steps=_SKETCH.value or rl_cfg.sketch_steps,
                          rule="maskgit", cfg_scale=_CFG_SCALE.value, temperature=1.0,
                          temperature_mode="mmada_annealed")
    share = _SHARE.value

  micro = _MICRO_BATCH.value
  if not _explicit(_MICRO_BATCH) and plan is not None:
    if cfg_mb_global and cfg_mb_global % batch_ways:
      raise ValueError(f"rl.micro_batch_size={cfg_mb_global} (config) is not a multiple of data*fsdp = "
                       f"{batch_ways}: set --micro_batch (rows per device)")
    micro = (cfg_mb_global or 0) // batch_ways
  return aot.Setup(model_cfg=model_cfg, layout=layout, rl=rl_cfg, sampler=s_cfg,
                   topology=_TOPOLOGY.value, mesh_shape=mesh, batch=_pick(_BATCH, cfg_batch),
                   micro_batch=micro, ref_dtype=_REF_DTYPE.value, share_sketch=share)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from htgrpo_jax import aot

  setup = build_setup()
  mesh = aot.topology_mesh(setup)  # validates every field before the first compile
  cfg, lay, r = setup.model_cfg, setup.layout, setup.rl_config
  print(f"# {_CONFIG.value or _MODEL.value}: d_model={cfg.d_model}, {cfg.n_layers} layers, "
        f"{cfg.num_params() / 1e9:.2f}B params, L={lay.seq_len}, N={lay.num_image_tokens}, "
        f"C={lay.codebook_size}", flush=True)
  print(f"# {setup.topology}: {mesh.devices.size} x {mesh.devices.flat[0].device_kind}, mesh "
        f"{dict(mesh.shape)}; batch {setup.batch} (G={r.group_size}), micro-batch {setup.micro_batch}/device "
        f"= {r.micro_batch_size or setup.batch} rows; K={r.num_iterations} ({r.estimator}), beta={r.beta}, "
        f"ref {setup.ref_dtype}; sampler T={setup.sampler.num_steps} cfg={setup.sampler.cfg_scale}",
        flush=True)
  rows = []
  for program in _WHAT.value:
    print(f"# compiling {program} ...", flush=True)
    report = aot.compile_program(setup, program, mesh)
    print(f"# {aot.memory_line(report)}; compile {report.compile_s:.0f} s", flush=True)
    rows.append(aot.markdown_row(setup, report))
  print(aot.TABLE_HEADER)
  print("\n".join(rows), flush=True)


if __name__ == "__main__":
  app.run(main)
