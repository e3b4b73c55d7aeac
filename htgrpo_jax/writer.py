"""Everything a run writes on the host: metrics (``metrics.jsonl`` + TensorBoard), evaluation
reports (Markdown tables, sample grids, every sample with its verdict), the reward curve,
``results.md``, the progress bar and the log lines.

Process-0 aware: in a multi-process run every write and print here happens on process 0 only
(``parallel.is_primary()``); on the other processes the same calls are no-ops, so callers need no
``if`` of their own and every process runs the same code path. Reading (``load_eval_samples``)
works anywhere. What process 0 writes is computed from values every process holds identically
(rewards and verdicts are shared by ``rollouts.host_once``), so nothing is lost by writing once.

Every path may be a URL (``gs://bucket/run``): files go through ``htgrpo_jax.paths``. Object
stores cannot append, so on a URL ``RunLog`` keeps ``metrics.jsonl`` in memory and rewrites it
at flushes only (not at every logged step), and TensorBoard's event files are written to a local
folder and copied up at the same flushes (``RunLog``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable

import numpy as np
from absl import logging

from htgrpo_jax import evaluate, parallel, paths


def primary_log(log: Callable[[str], None]) -> Callable[[str], None]:
  """``log`` on process 0, a no-op elsewhere (one copy of every line, not one per host)."""

  def on_primary(msg: str) -> None:
    if parallel.is_primary():
      log(msg)

  return on_primary


def _write_text(path: str, text: str) -> None:
  paths.write_text_atomic(path, text)  # a reader never sees half a table


# ------------------------------------------------------------------------------------------------
# Evaluations


def write_eval(out_dir: str, name: str, res: dict[str, Any], title: str, grid_size: int) -> str:
  """Writes ``eval_{name}.md`` (per-tag table with 95 % intervals), ``grid_{name}.png`` and every
  sample with its verdict under ``evals/{name}/`` (``samples.jsonl`` + PNGs); returns the table
  (on every process; only process 0 writes)."""
  table = evaluate.tag_table(res["tags"], res["strict"], title=title, clusters=res["prompt_index"])
  watch = evaluate.eval_watch(res)
  if watch:
    table += "\n" + ", ".join(f"{k} {v:.3f}" for k, v in watch.items()) + "\n"
  if not parallel.is_primary():
    return table
  paths.makedirs(out_dir)
  _write_text(paths.join(out_dir, f"eval_{name}.md"), table)
  evaluate.write_samples(paths.join(out_dir, "evals", name), res)
  n = min(grid_size, len(res["captions"]))
  if n:
    caps = [f"{c}\n{'PASS' if s else 'fail'}" for c, s in zip(res["captions"][:n], res["strict"][:n])]
    evaluate.image_grid(res["images"][:n], caps, paths.join(out_dir, f"grid_{name}.png"))
  return table


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON at ``path`` (process 0)."""
  if parallel.is_primary():
    paths.makedirs(os.path.dirname(os.fspath(path)) or ".")
    paths.write_text_atomic(path, json.dumps(obj, indent=2))


def load_eval_samples(out_dir: str, name: str) -> dict[str, np.ndarray] | None:
  """``tags``, ``prompt_index`` and ``strict`` of an evaluation written by ``write_eval``."""
  path = paths.join(out_dir, "evals", name, "samples.jsonl")
  if not paths.exists(path):
    return None
  with paths.open(path, encoding="utf-8") as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return dict(
      tags=np.asarray([r["tag"] for r in recs]),
      prompt_index=np.asarray([r["prompt_index"] for r in recs]),
      strict=np.asarray([float(r["correct"]) for r in recs]),
  )


def results_table(out_dir: str, first: int, last: int, evals: dict[int, dict[str, float]], title: str) -> str:
  """Base (``first``) vs final (``last``) per-tag table with 95 % cluster-bootstrap intervals and a
  paired interval of the change, when both evaluations sampled the same prompts the same way."""
  name = lambda s: f"step{s:05d}"
  label = lambda s: "base" if s == 0 else f"step {s}"
  cols = {label(s): evals[s] for s in (first, last)}
  a, b = load_eval_samples(out_dir, name(first)), load_eval_samples(out_dir, name(last))
  if (
      a is None
      or b is None
      or len(a["strict"]) != len(b["strict"])
      or not np.array_equal(a["prompt_index"], b["prompt_index"])
  ):
    return evaluate.comparison_table(cols, title=title)
  draws = evaluate.bootstrap_draws(a["tags"], a["prompt_index"], [a["strict"], b["strict"]])
  intervals = {label(s): {t: evaluate.interval(d[i]) for t, d in draws.items()} for i, s in enumerate((first, last))}
  change = {t: evaluate.interval(d[1] - d[0]) for t, d in draws.items()}
  return evaluate.comparison_table(cols, title=title, intervals=intervals, change_intervals=change)


def write_report(
    workdir: str,
    history: list[dict[str, float]],
    evals: dict[int, dict[str, float]],
    *,
    curve_title: str,
    table_title: str,
) -> str:
  """``reward_curve.png`` (train reward per step, held-out overall per evaluation) and, once there
  is an evaluation, ``results.md`` (first vs last evaluation). Returns the table ('' without an
  evaluation, and on processes other than 0, which write nothing)."""
  if not parallel.is_primary():
    return ""
  evaluate.plot_curves(
      paths.join(workdir, "reward_curve.png"),
      [(h["step"], h["reward"]) for h in history],
      [(s, e["overall"]) for s, e in sorted(evals.items())],
      title=curve_title,
  )
  if not evals:
    return ""
  steps = sorted(evals)
  table = results_table(workdir, steps[0], steps[-1], evals, title=table_title)
  _write_text(paths.join(workdir, "results.md"), table)
  return table


# ------------------------------------------------------------------------------------------------
# Metrics


def flat_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """The train step's host metrics as ``{'name' or 'group/name': float}``: scalars only, the
  per-iteration ``iter`` group left out (it lives in the step's K-long arrays)."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, dict):
      if k == "iter":
        continue
      out.update({f"{k}/{kk}": float(vv) for kk, vv in v.items() if np.ndim(vv) == 0})
    elif np.ndim(v) == 0:
      out[k] = float(v)
  return out


class RunLog:
  """TensorBoard scalars + ``metrics.jsonl`` of a run directory (process 0; a no-op elsewhere).

  On a local workdir every ``scalars`` call appends its line and TensorBoard writes under
  ``<workdir>/tb``, as always. On a URL workdir (``gs://...``) an object store can only rewrite a
  file whole, so the lines are kept in memory and ``metrics.jsonl`` is rewritten by ``flush``:
  at a logged step at least ``flush_s`` seconds after the previous flush, at every ``flush`` call
  (the trainer flushes at each checkpoint save and evaluation, so the log on the bucket covers
  every step a checkpoint holds) and at ``close``. TensorBoard's events go to a local temporary
  folder and are copied to ``<workdir>/tb`` at the same flushes (tensorboardX writes ``gs://``
  itself only with ``google-cloud-storage`` installed; this works with whatever backend
  ``htgrpo_jax.paths`` uses). tensorboardX writes events from a background thread, so a flush
  copies what it has written so far; ``close`` copies everything.

  Args:
    workdir: the run directory (a local path or a URL).
    start_step: the step the run (re)starts from: ``metrics.jsonl`` lines after it are dropped,
      since a resumed run re-does those steps and the log must read as one uninterrupted run.
    flush_s: a URL workdir's minimum seconds between flushes made by ``scalars``.
    log: where the one note about a URL workdir's TensorBoard copy goes (default: absl info).
  """

  def __init__(self, workdir: str, start_step: int, *, flush_s: float = 60.0, log: Callable[[str], None] | None = None):
    self.workdir = workdir
    self.jsonl = paths.join(workdir, "metrics.jsonl")
    self.tb_dir = paths.join(workdir, "tb")
    self.url = paths.is_url(workdir)
    self.flush_s = flush_s
    self.tb = None
    self._text = ""  # URL: the whole metrics.jsonl (object stores cannot append)
    self._dirty = False  # URL: lines not yet on the bucket
    self._tb_local: str | None = None  # URL: the local folder TensorBoard writes into
    self._copied: dict[str, int] = {}  # URL: size of each event file as last copied up
    self._last_flush = time.monotonic()
    if not parallel.is_primary():
      return
    from tensorboardX import SummaryWriter

    paths.makedirs(workdir)
    if self.url:
      self._tb_local = tempfile.mkdtemp(prefix="htgrpo_tb_")
      (log or (lambda m: logging.info("%s", m)))(
          f"TensorBoard events are written locally and copied to {self.tb_dir} at each save, "
          "evaluation and the end of the run"
      )
    # A URL's event files are copied up whole under their names: a unique suffix keeps a restart
    # within the same second (tensorboardX names files by the second) from replacing them.
    self.tb = SummaryWriter(
        self._tb_local or self.tb_dir, filename_suffix=f".{uuid.uuid4().hex[:8]}" if self.url else ""
    )
    if paths.exists(self.jsonl):
      with paths.open(self.jsonl, encoding="utf-8") as f:
        text = f.read()
      keep = "".join(ln + "\n" for ln in text.splitlines() if _logged_at_or_before(ln, start_step))
      if self.url:
        self._text = keep
      if keep != text:
        paths.write_text_atomic(self.jsonl, keep)

  def scalars(self, step: int, scalars: dict[str, float], extra: dict[str, Any]) -> None:
    """One ``metrics.jsonl`` line (``scalars`` and ``extra``) and the scalars in TensorBoard."""
    if self.tb is None:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    line = json.dumps(dict(step=step, **scalars, **extra)) + "\n"
    if not self.url:
      paths.append_text(self.jsonl, line)
      return
    self._text += line
    self._dirty = True
    if time.monotonic() - self._last_flush >= self.flush_s:
      self.flush()

  def tb_scalars(self, step: int, scalars: dict[str, float]) -> None:
    """TensorBoard only (the evaluation's scores, which have their own tables)."""
    if self.tb is None:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)

  def flush(self) -> None:
    """Makes everything logged so far readable in the workdir. On a URL a failed upload is
    logged and retried at the next flush (``close`` raises it instead)."""
    if self.tb is None:
      return
    self.tb.flush()
    if self.url:
      try:
        self._upload()
      except Exception as e:  # noqa: BLE001 - a metrics upload must not end a training run
        logging.warning(
            "RunLog: writing %s failed (%s: %s); retried at the next flush", self.workdir, type(e).__name__, e
        )

  def _upload(self) -> None:
    """URL workdir: rewrites ``metrics.jsonl`` when it changed and copies up the event files
    that grew since the last copy."""
    if self._dirty:
      paths.write_text_atomic(self.jsonl, self._text)
      self._dirty = False
    for root, _, files in os.walk(self._tb_local):
      for name in sorted(files):
        src = os.path.join(root, name)
        rel = os.path.relpath(src, self._tb_local)
        size = os.path.getsize(src)
        if self._copied.get(rel) == size:
          continue
        dst = paths.join(self.tb_dir, *rel.split(os.sep))
        paths.makedirs(os.path.dirname(dst))
        with open(src, "rb") as r, paths.open(dst, "wb") as w:
          w.write(r.read())
        self._copied[rel] = size
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if self.tb is None:
      return
    tb, self.tb = self.tb, None
    tb.close()
    if not self.url:
      return
    try:
      self._upload()
    except Exception as e:
      raise OSError(
          f"RunLog: writing the logs to {self.workdir} failed ({type(e).__name__}: {e}); "
          f"its TensorBoard events are kept in {self._tb_local}"
      ) from e
    shutil.rmtree(self._tb_local, ignore_errors=True)
    self._tb_local = None


def _logged_at_or_before(line: str, step: int) -> bool:
  """A ``metrics.jsonl`` line to keep on a resume from ``step`` (a line torn by a kill is dropped)."""
  if not line.strip():
    return False
  try:
    return json.loads(line)["step"] <= step
  except (ValueError, KeyError, TypeError):
    return False


class Progress:
  """The tqdm progress bar of the RL loop, drawn on process 0 only (and only with ``enabled``);
  ``write`` prints a line above it (process 0, whether or not the bar is drawn)."""

  def __init__(self, total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    self._primary = parallel.is_primary()
    self._bar = tqdm(
        total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not (enabled and self._primary)
    )

  def update(self, n: int = 1) -> None:
    self._bar.update(n)

  def set_postfix(self, **values: str) -> None:
    self._bar.set_postfix(**values)

  def write(self, msg: str) -> None:
    if self._primary:  # tqdm.write prints even for a disabled bar
      self._bar.write(msg)

  def close(self) -> None:
    self._bar.close()
