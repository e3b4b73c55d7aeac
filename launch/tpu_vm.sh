#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, install htgrpo_jax on every worker, run the trainer on all of
# them at once (each worker runs the same command; launch/train.py calls jax.distributed.initialize()
# when it sees a multi-host slice).
#
#   launch/tpu_vm.sh create  NAME           # TPU VM / pod slice ($ACCELERATOR, $ZONE, $RUNTIME)
#   launch/tpu_vm.sh install NAME           # copy this checkout to every worker, pip install -e ".[train,tpu]"
#   launch/tpu_vm.sh train   NAME [FLAGS]   # python launch/train.py $CONFIG FLAGS on every worker
#   launch/tpu_vm.sh aot     [FLAGS]        # pre-flight here, before renting: launch/aot_compile.py
#   launch/tpu_vm.sh ssh     NAME [CMD]     # run CMD (default: a shell) on worker 0
#   launch/tpu_vm.sh delete  NAME
#
# Environment: ZONE (us-east5-a), ACCELERATOR (v5p-128), RUNTIME (picked from the accelerator),
# PROJECT (gcloud's default), CONFIG (--config=configs/mmada_geneval.py), REMOTE_DIR (~/htgrpo_jax).
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-128}
CONFIG=${CONFIG:---config=configs/mmada_geneval.py}
REMOTE_DIR=${REMOTE_DIR:-'~/htgrpo_jax'}
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
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project="$PROJECT")

cmd=${1:-}; shift || true
need_name() { [ -n "${1:-}" ] || { echo "tpu_vm.sh $cmd: missing NAME" >&2; exit 2; }; }
here=$(cd "$(dirname "$0")/.." && pwd)

case "$cmd" in
  create)
    need_name "${1:-}"
    run gcloud compute tpus tpu-vm create "$1" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" "${project_flag[@]}"
    ;;
  install)
    need_name "${1:-}"
    # Ship the checkout (not a registry release) so every worker runs exactly this code.
    tarball=$(mktemp -d)/htgrpo_jax.tar.gz
    run tar -C "$here" --exclude=.venv --exclude=.git --exclude=runs -czf "$tarball" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$1":htgrpo_jax.tar.gz --worker=all --zone="$ZONE" "${project_flag[@]}"
    run gcloud compute tpus tpu-vm ssh "$1" --worker=all --zone="$ZONE" "${project_flag[@]}" --command="\
mkdir -p $REMOTE_DIR && tar -xzf htgrpo_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
python3 -m pip install -U pip && python3 -m pip install -e '.[train,tpu]'"
    ;;
  train)
    need_name "${1:-}"; name=$1; shift
    run gcloud compute tpus tpu-vm ssh "$name" --worker=all --zone="$ZONE" "${project_flag[@]}" --command="\
cd $REMOTE_DIR && python3 launch/train.py $CONFIG $*"
    ;;
  aot)
    run python "$here/launch/aot_compile.py" "$@"
    ;;
  ssh)
    need_name "${1:-}"; name=$1; shift
    if [ $# -gt 0 ]; then
      run gcloud compute tpus tpu-vm ssh "$name" --worker=0 --zone="$ZONE" "${project_flag[@]}" --command="$*"
    else
      run gcloud compute tpus tpu-vm ssh "$name" --worker=0 --zone="$ZONE" "${project_flag[@]}"
    fi
    ;;
  delete)
    need_name "${1:-}"
    run gcloud compute tpus tpu-vm delete "$1" --zone="$ZONE" --quiet "${project_flag[@]}"
    ;;
  *)
    sed -n '2,18p' "$0" >&2; exit 2 ;;
esac
