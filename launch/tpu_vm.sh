#!/usr/bin/env bash
# Cloud TPU VM / pod slice: create it, install htgrpo_jax on every worker, run the trainer detached
# on all of them at once (each worker runs the same command; launch/train.py starts JAX's
# multi-process runtime when it finds a multi-host slice), read the logs, stop, delete.
#
#   launch/tpu_vm.sh create  NAME            # TPU VM / pod slice ($ACCELERATOR, $ZONE, $RUNTIME)
#   launch/tpu_vm.sh install NAME            # ship this checkout to every worker; Python 3.11 venv; .[tpu,train]
#   launch/tpu_vm.sh train   NAME [FLAGS]    # launch/train.py $CONFIG FLAGS on every worker, detached
#   launch/tpu_vm.sh logs    NAME [LINES]    # last LINES (50) lines of each worker's log ($WORKER: all)
#   launch/tpu_vm.sh stop    NAME            # SIGTERM every worker's trainer (it saves, then exits)
#   launch/tpu_vm.sh ssh     NAME [CMD...]   # run CMD (default: a shell) on worker $WORKER (0)
#   launch/tpu_vm.sh delete  NAME
#   launch/tpu_vm.sh aot     [FLAGS]         # pre-flight here, before renting: launch/aot_compile.py
#
# FLAGS are passed to launch/train.py as they are: --config.key=value overrides (and --config=...
# to replace $CONFIG), e.g. --config.world.reward_url=http://reward-host:8000/score.
# Environment: ZONE (us-east5-a), ACCELERATOR (v5p-128), RUNTIME (picked from the accelerator),
# PROJECT (gcloud's default), SPOT (1: a spot slice), CONFIG (--config=configs/mmada_geneval.py),
# REMOTE_DIR (~/htgrpo_jax), VENV (~/htgrpo_venv), PYTHON (3.11), LOG_DIR (~/htgrpo_logs),
# CACHE_DIR (~/jax_cache: JAX's compilation cache on each worker, "" = off), WORKER (logs: all,
# ssh: 0), STOP_WAIT (seconds stop waits for the trainers to exit, 300).
# DRY_RUN=1 prints the exact commands (one per line, shell-quoted) instead of running them.
# Remote paths may start with ~ and must not contain spaces. For example:
#
#   ACCELERATOR=v5p-16 launch/tpu_vm.sh create my-tpu && launch/tpu_vm.sh install my-tpu
#   launch/tpu_vm.sh train my-tpu --config.world.reward_url=http://reward-host:8000/score --config.total_steps=2000
#   launch/tpu_vm.sh logs my-tpu 100 && launch/tpu_vm.sh stop my-tpu
set -euo pipefail

ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-128}
CONFIG=${CONFIG:---config=configs/mmada_geneval.py}
REMOTE_DIR=${REMOTE_DIR:-'~/htgrpo_jax'}
VENV=${VENV:-'~/htgrpo_venv'}
PYTHON=${PYTHON:-3.11}
LOG_DIR=${LOG_DIR:-'~/htgrpo_logs'}
CACHE_DIR=${CACHE_DIR-'~/jax_cache'}
STOP_WAIT=${STOP_WAIT:-300}
if [ -z "${RUNTIME:-}" ]; then
  case "$ACCELERATOR" in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) echo "tpu_vm.sh: unknown ACCELERATOR '$ACCELERATOR'; set RUNTIME explicitly" >&2; exit 2 ;;
  esac
fi

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
gflags=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && gflags+=(--project="$PROJECT")
# ssh WORKER NAME REMOTE_COMMAND: one command on worker WORKER ("all": every worker at once).
on() {
  run gcloud compute tpus tpu-vm ssh "$2" --worker="$1" "${gflags[@]}" --command="$3"
}

cmd=${1:-}; shift || true
need_name() { [ -n "${1:-}" ] || { echo "tpu_vm.sh $cmd: missing NAME" >&2; exit 2; }; }
here=$(cd "$(dirname "$0")/.." && pwd)

# On a worker: its index in the slice (the TPU metadata server's agent-worker-number, the number
# JAX's own cluster detection uses), else its hostname; per-worker log and pid files carry it, so
# they stay apart even when LOG_DIR is a folder the workers share.
WORKER_ID='w=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'

case "$cmd" in
  create)
    need_name "${1:-}"
    spot=()
    [ "${SPOT:-0}" = 1 ] && spot=(--spot)
    run gcloud compute tpus tpu-vm create "$1" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" "${spot[@]}" "${gflags[@]}"
    ;;
  install)
    need_name "${1:-}"
    # Ship the checkout (not a registry release) so every worker runs exactly this code.
    tarball="${TMPDIR:-/tmp}/htgrpo_jax-$1.tar.gz"
    run tar -C "$here" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=__pycache__ \
      --exclude='*.egg-info' -czf "$tarball" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$1":htgrpo_jax.tar.gz --worker=all "${gflags[@]}"
    # Python: the TPU VM images run Ubuntu 22.04, whose python3 is 3.10; the package needs >= 3.11.
    # uv (a pip-installable static binary) fetches a standalone CPython build into the user's home
    # and makes the venv from it: no sudo, no apt PPA (deadsnakes) and no second system Python, the
    # same interpreter on every worker, seconds per worker. `uv pip` then installs the extras; jax[tpu]
    # brings libtpu from PyPI. A venv that exists is reused (install again to update the code).
    on all "$1" "set -e; mkdir -p $REMOTE_DIR && tar -xzf htgrpo_jax.tar.gz -C $REMOTE_DIR; \
python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv; \
[ -x $VENV/bin/python ] || python3 -m uv venv --python $PYTHON $VENV; \
cd $REMOTE_DIR && python3 -m uv pip install -q --python $VENV/bin/python -e '.[tpu,train]'; \
$VENV/bin/python -c 'import sys, jax, htgrpo_jax; print(sys.version.split()[0], jax.__version__)'"
    ;;
  train)
    need_name "${1:-}"; name=$1; shift
    flags=$CONFIG
    for a in "$@"; do case "$a" in --config=*) flags="" ;; esac; done  # FLAGS name the config
    [ -n "$CACHE_DIR" ] && flags+=" --config.compilation_cache_dir=$CACHE_DIR"
    for a in "$@"; do flags+=" $(printf '%q' "$a")"; done  # after the defaults: the user's win
    flags=${flags# }
    # setsid + nohup: the trainer leaves the ssh session's process group, so a dropped connection
    # (or the ssh returning at once, as here) does not kill it; its pid is its process group. The
    # child calls setsid() only once it runs: wait for that (up to 10 s) before reporting the pid,
    # so a `stop` right after `train` finds the group it signals.
    on all "$name" "$WORKER_ID; mkdir -p $LOG_DIR && cd $REMOTE_DIR || exit 1; \
pid=\$(cat $LOG_DIR/worker-\$w.pid 2>/dev/null) && kill -0 \$pid 2>/dev/null && \
{ echo \"worker \$w: already training (pid \$pid); launch/tpu_vm.sh stop first\"; exit 1; }; \
echo \"=== \$(date -u +%FT%TZ) worker \$w: launch/train.py $flags\" >> $LOG_DIR/worker-\$w.log; \
setsid nohup $VENV/bin/python launch/train.py $flags >> $LOG_DIR/worker-\$w.log 2>&1 < /dev/null & \
pid=\$!; for i in \$(seq 100); do [ \"\$(ps -o sid= -p \$pid | tr -d ' ')\" = \$pid ] && break; sleep 0.1; done; \
echo \$pid > $LOG_DIR/worker-\$w.pid; echo \"worker \$w: pid \$pid, log $LOG_DIR/worker-\$w.log\""
    ;;
  logs)
    need_name "${1:-}"
    lines=${2:-50}
    [[ "$lines" =~ ^[0-9]+$ ]] || { echo "tpu_vm.sh logs: LINES must be a number, got '$lines'" >&2; exit 2; }
    on "${WORKER:-all}" "$1" "$WORKER_ID; tail -v -n $lines $LOG_DIR/worker-\$w.log"
    ;;
  stop)
    need_name "${1:-}"
    # SIGTERM to each trainer's process group: the trainer saves its current step and exits.
    on all "$1" "$WORKER_ID; pid=\$(cat $LOG_DIR/worker-\$w.pid 2>/dev/null) && kill -0 \$pid 2>/dev/null \
|| { echo \"worker \$w: not training\"; exit 0; }; kill -TERM -- -\$pid; \
for i in \$(seq $STOP_WAIT); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; \
if kill -0 \$pid 2>/dev/null; then echo \"worker \$w: still running after ${STOP_WAIT}s (pid \$pid)\"; exit 1; fi; \
echo \"worker \$w: stopped\""
    ;;
  ssh)
    need_name "${1:-}"; name=$1; shift
    if [ $# -gt 0 ]; then
      on "${WORKER:-0}" "$name" "$*"
    else
      run gcloud compute tpus tpu-vm ssh "$name" --worker="${WORKER:-0}" "${gflags[@]}"
    fi
    ;;
  delete)
    need_name "${1:-}"
    run gcloud compute tpus tpu-vm delete "$1" --quiet "${gflags[@]}"
    ;;
  aot)
    run python "$here/launch/aot_compile.py" "$@"
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
