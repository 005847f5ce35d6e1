#!/usr/bin/env bash
# Launch mimjax on a Cloud TPU VM pod slice: the same command on every worker (--worker=all).
# See launch/README.md for the full walk-through.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh [options] COMMAND [-- extra mimjax.main flags]

Commands (run in this order the first time):
  create   create the TPU VM slice (gcloud compute tpus tpu-vm create)
  setup    copy this checkout to every worker and install it (venv + jax[tpu])
  check    on every worker: fail on stale /tmp/libtpu_lockfile, then check that every host
           joins jax.distributed (jax.process_count() == number of workers)
  run      check, then run `python -m mimjax.main --config C --workdir W` on every worker
  stop     kill mimjax/python processes holding the TPU on every worker
  delete   delete the slice

Options:
  --name NAME          TPU name                      (env TPU_NAME, required)
  --zone ZONE          e.g. us-central2-b            (env TPU_ZONE, required)
  --project PROJECT    gcloud project                (env TPU_PROJECT, default: gcloud's)
  --type TYPE          accelerator type, e.g. v4-32  (env TPU_TYPE; create)
  --version VERSION    TPU VM runtime                (env TPU_VERSION, default tpu-ubuntu2204-base)
  --config CONFIG      e.g. configs/mae.py:vit_b,in1k,1600ep, relative to the checkout
                       on the workers (run)
  --workdir gs://...   shared workdir; must be gs:// on a multi-host slice, else an
                       absolute path on the worker (run)
  --hosts N            expected number of hosts (default: read from gcloud describe)
  --remote-dir DIR     checkout location on the workers (default: mimjax)
  --clean-locks        remove stale /tmp/libtpu_lockfile instead of failing
  --detach             run: start with nohup (log: ~/mimjax_run.log on each worker)
  --dry-run            print the gcloud commands instead of running them
  -h, --help           this help

Example:
  launch/tpu_pod.sh --name mim-v4 --zone us-central2-b --type v4-32 create
  launch/tpu_pod.sh --name mim-v4 --zone us-central2-b setup
  launch/tpu_pod.sh --name mim-v4 --zone us-central2-b \
      --config configs/mae.py:vit_b,in1k,1600ep --workdir gs://BUCKET/mae_b run \
      -- --config.data.data_dir=gs://BUCKET/tfds
USAGE
}

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
TYPE=${TPU_TYPE:-}
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
CONFIG=""
WORKDIR=""
HOSTS=""
REMOTE_DIR=mimjax
CLEAN_LOCKS=0
DETACH=0
DRY_RUN=0
COMMAND=""
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --hosts) HOSTS=$2; shift 2 ;;
    --remote-dir) REMOTE_DIR=$2; shift 2 ;;
    --clean-locks) CLEAN_LOCKS=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    create|setup|check|run|stop|delete) COMMAND=$1; shift ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ -n "$COMMAND" ]] || { usage >&2; die "no COMMAND given"; }
[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
if [[ $DRY_RUN -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found: install the Google Cloud SDK (https://cloud.google.com/sdk)"
fi

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")

# Runs (or with --dry-run prints) one command.
run_cmd() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

# Runs a bash snippet on every worker.
on_all() {
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all \
    --command="$1"
}

expected_hosts() {
  if [[ -n "$HOSTS" ]]; then echo "$HOSTS"; return; fi
  if [[ $DRY_RUN -eq 1 ]]; then echo 1; return; fi
  gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" \
    --format='value(networkEndpoints.len())'
}

# A lock file with no process holding /dev/accel* or vfio is left by a killed run and makes
# the next libtpu start fail with "TPU in use"; `stop` + `--clean-locks` recovers.
LOCK_CHECK='if [ -e /tmp/libtpu_lockfile ]; then
  if sudo lsof -w /dev/accel* /dev/vfio/* >/dev/null 2>&1; then
    echo "$(hostname): TPU busy: a process holds it (launch/tpu_pod.sh ... stop)"; exit 3
  elif [ "'"$CLEAN_LOCKS"'" = 1 ]; then
    sudo rm -f /tmp/libtpu_lockfile && echo "$(hostname): removed stale /tmp/libtpu_lockfile"
  else
    echo "$(hostname): stale /tmp/libtpu_lockfile (no process holds the TPU); rerun with --clean-locks"; exit 3
  fi
fi'

JOIN_CHECK="cd $REMOTE_DIR && MIMJAX_DISTRIBUTED=1 .venv/bin/python -c 'import jax; jax.distributed.initialize(); print(\"MIMJAX_JOINED\", jax.process_index(), jax.process_count(), jax.device_count(), flush=True)'"

do_check() {
  local expected out joined counts
  expected=$(expected_hosts)
  on_all "$LOCK_CHECK"
  if [[ $DRY_RUN -eq 1 ]]; then
    on_all "$JOIN_CHECK"
    return
  fi
  out=$(on_all "$JOIN_CHECK" 2>&1) || { echo "$out" >&2; die "join check failed on some worker"; }
  joined=$(grep -c '^MIMJAX_JOINED' <<<"$out" || true)
  counts=$(grep '^MIMJAX_JOINED' <<<"$out" | awk '{print $3}' | sort -u | tr '\n' ' ')
  if [[ "$joined" != "$expected" || "$counts" != "$expected " ]]; then
    echo "$out" >&2
    die "expected $expected hosts; $joined answered, jax.process_count() = ${counts:-none}"
  fi
  echo "all $expected hosts joined (jax.process_count() = $expected)"
}

case "$COMMAND" in
  create)
    [[ -n "$TYPE" ]] || die "create needs --type (e.g. v4-32)"
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$TYPE" --version="$VERSION"
    ;;
  setup)
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    run_cmd gcloud compute tpus tpu-vm scp --recurse "$ROOT" "$NAME:~/$REMOTE_DIR" \
      "${GCLOUD_FLAGS[@]}" --worker=all
    on_all "cd $REMOTE_DIR && rm -rf .venv && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]'"
    ;;
  check)
    do_check
    ;;
  run)
    [[ -n "$CONFIG" ]] || die "run needs --config"
    [[ -n "$WORKDIR" ]] || die "run needs --workdir"
    if [[ "$WORKDIR" != *://* && "$WORKDIR" != /* ]]; then
      die "--workdir $WORKDIR: a relative path would be taken relative to ~/$REMOTE_DIR on each worker, not to this directory; give gs://... or an absolute path"
    fi
    if [[ "$(expected_hosts)" != 1 && "$WORKDIR" != gs://* ]]; then
      die "--workdir $WORKDIR: a multi-host slice needs a shared gs:// workdir"
    fi
    do_check
    ARGS=$(printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")
    MAIN="cd $REMOTE_DIR && MIMJAX_DISTRIBUTED=1 .venv/bin/python -m mimjax.main$ARGS"
    if [[ $DETACH -eq 1 ]]; then
      on_all "nohup bash -c $(printf '%q' "$MAIN") > ~/mimjax_run.log 2>&1 < /dev/null &"
    else
      on_all "$MAIN"
    fi
    ;;
  stop)
    on_all "pkill -f 'mimjax.main' || true"
    ;;
  delete)
    run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
    ;;
esac
