"""Every command line a reader can copy: each ``python launch/<script>.py ...`` and
``launch/tpu_vm.sh ...`` line in README.md, in the configs' docstrings and in launch/*'s help text
parses through that script's real flags (the script itself is run, with ``absl.app.run`` replaced
by the flag parse: config files load, ``--config.*`` overrides apply, required flags and validators
run), and training configs pass the trainer's validated plan. ``--help`` lines and tpu_vm.sh lines
(in DRY_RUN mode, whose ``train`` flags are then parsed by launch/train.py) are run for real.

And every ``rl.*`` and ``sampler.*`` knob of the training configs can be set with ``--config.x=y``:
the value reaches ``trainer.plan``'s HTGRPOConfig / SamplerConfig."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.config_flags import parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = (
    ["README.md"]
    + [f"configs/{n}" for n in sorted(os.listdir(os.path.join(REPO, "configs"))) if n.endswith(".py")]
    + [f"launch/{n}" for n in sorted(os.listdir(os.path.join(REPO, "launch"))) if n.endswith((".py", ".sh"))]
)
# A command ends at a comment, a Markdown code/table delimiter, a closing parenthesis or '&&'.
_END = re.compile(r"\s+#|`|\s\|\s|\)|&&|\s\|$")


def _commands() -> list[tuple[str, str]]:
  """(where, command) for every concrete launch/ command line in SOURCES (templates with
  [optional] parts or NAME/FLAGS placeholders are skipped)."""
  out = []
  for src in SOURCES:
    text = open(os.path.join(REPO, src), encoding="utf-8").read()
    if src.endswith(".py"):  # its docstring (the help text absl prints)
      text = ast.get_docstring(ast.parse(text)) or ""
    elif src.endswith(".sh"):  # its header comment (the usage the script prints)
      text = "\n".join(ln for ln in text.splitlines()[1:] if ln.startswith("#"))
    text = text.replace("\\\n", " ")
    for lineno, line in enumerate(text.splitlines(), 1):
      for m in re.finditer(r"(?:python3? +)?(launch/\w+\.(?:py|sh))\b", line):
        start = m.start()
        if m.group(1).endswith(".py") and not m.group(0).startswith("python"):
          continue  # a mention of the file, not a command
        rest = line[m.end() :]
        end = _END.search(rest)
        cmd = (m.group(1) + rest[: end.start() if end else len(rest)]).strip()
        if m.group(1).endswith(".sh"):
          prefix = line[:start].strip().lstrip("#").strip()
          env = re.findall(r"(\b[A-Z_]+=\S+)\s*$", prefix)
          if (
              " NAME" in cmd
              or "FLAGS" in cmd
              or "[" in cmd
              or cmd == m.group(1)
              or not re.match(r"launch/tpu_vm\.sh [a-z]+ [\w-]+", cmd)
          ):
            continue
          cmd = " ".join(env + [cmd])
        elif "[" in cmd.split("--", 1)[-1] and re.search(r"\s\[--", cmd):
          continue  # "[--config.key=value ...]": a template
        out.append((f"{src}:{lineno}", cmd))
  return out


COMMANDS = _commands()
PY = [(w, c) for w, c in COMMANDS if c.startswith("launch/") and c.split()[0].endswith(".py")]
SH = [(w, c) for w, c in COMMANDS if ".sh" in c.split()[0] or "=" in c.split()[0]]


def test_the_documented_commands_are_found():
  scripts = {c.split()[0] for _, c in PY}
  assert {
      "launch/train.py",
      "launch/evaluate.py",
      "launch/pretrain.py",
      "launch/study.py",
      "launch/reward_server.py",
      "launch/convert_checkpoint.py",
      "launch/aot_compile.py",
  } <= scripts
  assert len(PY) >= 25 and len(SH) >= 4, (len(PY), len(SH))
  assert any("tpu_vm.sh train" in c for _, c in SH)


# One process parses every line: each script is run with app.run replaced by the flag parse; the
# flags a script defined are deleted afterwards so the next line's script can define its own.
HARNESS = textwrap.dedent(r"""
    import json, runpy, sys
    from absl import app, flags
    FLAGS = flags.FLAGS

    class Parsed(Exception):
      pass

    def parse_only(main, argv=None, flags_parser=None):
      rest = FLAGS(sys.argv)
      if len(rest) > 1:
        raise app.UsageError(f"unexpected arguments: {rest[1:]}")
      raise Parsed

    app.run = parse_only
    base = set(FLAGS)
    results = []
    for script, args in json.loads(sys.stdin.read()):
      sys.argv = [script, *args]
      rec = {}
      try:
        runpy.run_path(script, run_name="__main__")
        rec["error"] = "the script never called app.run"
      except Parsed:
        try:
          mine = sorted(n for n in FLAGS if n not in base and "." not in n)
          rec["flags"] = {n: repr(FLAGS[n].value) for n in mine if n != "config"}
          if "config" in mine:
            cfg = FLAGS["config"].value
            rec["config"] = json.loads(cfg.to_json_best_effort())
            if script.rsplit("/", 1)[-1] in ("train.py", "evaluate.py", "aot_compile.py"):
              from htgrpo_jax import trainer
              trainer.plan(cfg)
              rec["planned"] = True
        except BaseException as e:  # noqa: BLE001 (reported per line)
          rec["error"] = f"plan: {type(e).__name__}: {e}"
      except BaseException as e:  # noqa: BLE001 (reported per line)
        rec["error"] = f"{type(e).__name__}: {e}"
      finally:
        for n in [n for n in FLAGS if n not in base]:
          delattr(FLAGS, n)
        FLAGS.unparse_flags()
      results.append(rec)
    print("RESULTS " + json.dumps(results))
    """)


def _tpu_vm(cmd: str) -> list[list[str]]:
  words = shlex.split(cmd)
  env = dict(os.environ, DRY_RUN="1")
  while "=" in words[0]:
    k, v = words.pop(0).split("=", 1)
    env[k] = v
  out = subprocess.run(
      ["bash", os.path.join(REPO, words[0]), *words[1:]], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, f"{cmd}: {out.stderr}"
  return [shlex.split(line) for line in out.stdout.splitlines()]


def _train_args_of(remote: str) -> list[str]:
  """The launch/train.py arguments inside tpu_vm.sh's remote train command."""
  m = re.search(r"python launch/train\.py (.*?) >> ", remote)
  assert m, remote
  return shlex.split(m.group(1))


@pytest.fixture(scope="module")
def parsed():
  jobs, keys = [], []
  for where, cmd in PY:
    if "--help" in cmd.split():
      continue
    words = shlex.split(cmd)
    jobs.append((words[0], words[1:]))
    keys.append(cmd)
  for where, cmd in SH:
    for part in cmd.split(" && "):
      if " train " in f" {part} ":
        for line in _tpu_vm(part):
          if line[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            jobs.append(("launch/train.py", _train_args_of(line[-1][len("--command=") :])))
            keys.append(part)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run(
      [sys.executable, "-c", HARNESS],
      input=json.dumps(jobs),
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")][-1][8:])
  by_cmd = {}
  for key, job, rec in zip(keys, jobs, results):
    by_cmd.setdefault(key, []).append((job, rec))
  return by_cmd


@pytest.mark.parametrize("where,cmd", PY, ids=[f"{w} {c.split()[0]}" for w, c in PY])
def test_documented_python_command_parses(where, cmd, parsed):
  words = shlex.split(cmd)
  if "--help" in words:  # cheap: run it
    out = subprocess.run(
        [sys.executable, *words],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    # absl prints the usage and exits with status 1 on --help.
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"{words[0]}:" in out.stdout and "--config" in out.stdout, out.stdout[-2000:]
    return
  [(job, rec)] = parsed[cmd][:1]
  assert "error" not in rec, f"{where}: {cmd}\n{rec['error']}"
  # Every --key=value on the line reached the parsed flags or the config.
  for word in words[1:]:
    key, _, value = word.lstrip("-").partition("=")
    if key.startswith("config."):
      node = rec["config"]
      for part in key.split(".")[1:]:
        node = node[part]
      assert str(node).lower() == value.lower() or _same_number(node, value) or str(node) == str(value.split(",")), (
          where,
          key,
          node,
          value,
      )
    elif key != "config":
      assert key in rec["flags"] or key.removeprefix("no") in rec["flags"], (where, key)


def _same_number(a, b) -> bool:
  try:
    return float(a) == float(b)
  except (TypeError, ValueError):
    return False


@pytest.mark.parametrize("where,cmd", SH, ids=[w for w, _ in SH])
def test_documented_tpu_vm_command_dry_runs(where, cmd, parsed):
  for part in cmd.split(" && "):
    lines = _tpu_vm(part)
    assert lines and all(line[0] in ("gcloud", "tar") for line in lines), (where, lines)
    if " train " in f" {part} ":
      recs = [rec for _, rec in parsed[part]]
      assert recs and all("error" not in r and r.get("planned") for r in recs), (where, recs)
      user = [w for w in shlex.split(part) if w.startswith("--config.")]
      remote_args = _train_args_of(lines[-1][-1][len("--command=") :])
      assert remote_args[-len(user) :] == user  # passed through, in order, last (so they win)


# ---- every rl.* / sampler.* knob is settable -----------------------------------------------------


def _choices():
  from htgrpo_jax import rl
  from htgrpo_jax.rl import config as rc
  from htgrpo_jax.sampling import schedules

  return {
      "rl.preset": tuple(rl.PRESETS),
      "rl.partition_mode": rc.PARTITION_MODES,
      "rl.estimator": rc.ESTIMATORS,
      "rl.refine_context": rc.REFINE_CONTEXTS,
      "rl.sketch_context": rc.SKETCH_CONTEXTS,
      "rl.update_schedule": rc.UPDATE_SCHEDULES,
      "rl.credit_normalization": rc.CREDIT_NORMALIZATIONS,
      "rl.estimator_guidance": rc.ESTIMATOR_GUIDANCE,
      "sampler.rule": ("maskgit", "emerge"),
      "sampler.temperature_mode": ("constant", "mmada_annealed"),
      "sampler.schedule": tuple(schedules.SCHEDULE_NAMES),
  }


# Knobs that only make sense with a partner setting.
COMPANIONS = {
    "rl.num_sketches": ["--config.sampler.share_sketch=true"],
    "sampler.share_sketch": ["--config.rl.num_sketches=2"],
    "sampler.sketch_steps": ["--config.rl.sketch_fraction=0.25"],
    # The default's trajectory-replayed sketch canvas belongs to the 'htgrpo' estimator only
    # (configs/geneval.py:<preset> sets it for htgrpo alone).
    "rl.estimator": ["--config.rl.sketch_context=all_mask"],
    "rl.preset": ["--config.rl.sketch_context=all_mask"],
}


def _knobs():
  from htgrpo_jax.tasks import load_config_file

  c = load_config_file(os.path.join(REPO, "configs", "geneval.py"))
  out = []
  for section in ("rl", "sampler"):
    for key in c[section].keys():
      out.append(f"{section}.{key}")
  return out


def _planned_value(p, key):
  section, name = key.split(".")
  if key == "sampler.share_sketch":
    return p.share_sketch
  if key == "rl.preset":
    return None  # a preset is a set of values, not one field
  return getattr(p.rl if section == "rl" else p.sampler, name)


def _candidates(key, kind, default):
  if key in _choices():
    return [v for v in _choices()[key] if v != default]
  if kind is bool:
    return [not default]
  if kind is int:
    base = default or 0
    return [v for v in dict.fromkeys([base + 1, base + 2, 2 * base, 1, 2, 3, 4, 6, 0]) if v != default]
  if kind is float:
    base = default if default is not None else 0.5
    return [v for v in dict.fromkeys([base * 0.5, base + 0.25, 0.5, 0.1, 0.25, 2.0, 0.0]) if v != default]
  raise AssertionError(f"{key}: no candidate values for type {kind} (add it to _choices)")


@pytest.mark.parametrize("key", _knobs())
def test_every_rl_and_sampler_knob_is_settable_from_the_command_line(key, monkeypatch):
  monkeypatch.chdir(REPO)
  from htgrpo_jax import trainer
  from htgrpo_jax.rl.config import HTGRPOConfig

  base_cfg = parse(["--config=configs/geneval.py"])
  base_plan = trainer.plan(base_cfg)
  section, name = key.split(".")
  default = base_cfg[section][name]
  if default is None:  # an rl placeholder: typed by the dataclass, valued by the preset
    kind = {"int": int, "float": float, "str": str, "bool": bool}[
        str(HTGRPOConfig.__dataclass_fields__[name].type).replace(" | None", "").strip()
    ]
    default = getattr(base_plan.rl, name)
  else:
    kind = type(default)
  tried = []
  for value in _candidates(key, kind, default):
    flag = str(value).lower() if kind is bool else str(value)
    cfg = parse(["--config=configs/geneval.py", f"--config.{key}={flag}", *COMPANIONS.get(key, [])])
    got = cfg[section][name]
    assert got == value and type(got) is kind, (key, value, got)  # the flag parser typed it
    try:
      p = trainer.plan(cfg)
    except ValueError as e:
      tried.append(f"{value}: {e}")
      continue
    if key == "rl.preset":
      assert p.rl != base_plan.rl  # another preset: other values
    else:
      assert _planned_value(p, key) == value, (key, value, _planned_value(p, key))
    return
  pytest.fail(f"--config.{key}: no value other than the default {default!r} passes the plan:\n" + "\n".join(tried))


@pytest.mark.parametrize("name", ["mmada_geneval.py", "lumina_dimoo_geneval.py"])
def test_8b_configs_take_the_same_knobs(name, monkeypatch):
  monkeypatch.chdir(REPO)
  base = parse(["--config=configs/geneval.py"])
  c = parse(
      [
          f"--config=configs/{name}",
          "--config.rl.beta=0.5",
          "--config.sampler.cfg_scale=1.5",
          "--config.log_level=warning",
          "--config.compilation_cache_dir=/tmp/c",
          "--config.profile_steps=3,5",
      ]
  )
  assert set(c.rl.keys()) == set(base.rl.keys()) and set(c.sampler.keys()) == set(base.sampler.keys())
  assert (c.rl.beta, c.sampler.cfg_scale, c.log_level, c.compilation_cache_dir, c.profile_steps) == (
      0.5,
      1.5,
      "warning",
      "/tmp/c",
      "3,5",
  )
