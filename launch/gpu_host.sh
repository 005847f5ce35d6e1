#!/usr/bin/env bash
# Run mimjax on one host with all its GPUs (one process; jit shards over every local GPU).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_host.sh --config CONFIG --workdir DIR [options] [-- extra mimjax.main flags]

Runs `python -m mimjax.main --config CONFIG --workdir DIR` in one process that uses every
visible GPU (restrict with CUDA_VISIBLE_DEVICES). Before starting it checks that JAX sees as
many GPUs as nvidia-smi lists. It runs in the directory you call it from (relative paths are
relative to it, as for any command; a relative CONFIG not found there is looked up in this
checkout) and imports mimjax from this checkout (PYTHONPATH).

Options:
  --config CONFIG   e.g. configs/mae.py:vit_b,in100,800ep
  --workdir DIR     local or gs:// directory (re-running resumes from its checkpoints)
  --python PATH     interpreter (default: .venv/bin/python if present, else python3)
  --no-check        skip the GPU-count check
  --dry-run         print the command (exactly what would run, here) instead of running it
  -h, --help        this help

Example:
  launch/gpu_host.sh --config configs/mae.py:vit_b,in100,800ep --workdir /data/runs/mae_b \
      -- --config.data.data_dir=/data/tfds --config.model.dtype=bfloat16
USAGE
}

die() { echo "gpu_host.sh: error: $*" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=""
WORKDIR=""
PYTHON=""
CHECK=1
DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --no-check) CHECK=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ -n "$CONFIG" ]] || { usage >&2; die "--config is required"; }
[[ -n "$WORKDIR" ]] || { usage >&2; die "--workdir is required"; }
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# Let XLA take most of the GPU memory up front (fewer fragmentation OOMs); override if shared.
# The command runs here, in the caller's directory: relative paths mean what the caller meant.
CMD=(env "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}"
     "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
     "$PYTHON" -m mimjax.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi

if [[ $CHECK -eq 1 ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found (no NVIDIA driver?); use --no-check to run anyway"
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    want=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  else
    want=$(nvidia-smi --list-gpus | grep -c '^GPU')
  fi
  got=$("$PYTHON" -c 'import jax; print(jax.local_device_count("gpu"))' 2>/dev/null) \
    || die "JAX sees no GPU backend: install jax[cuda12] into $PYTHON's environment"
  [[ "$got" == "$want" ]] || die "JAX sees $got GPUs but $want are visible; check the CUDA install"
  echo "gpu_host.sh: $got GPUs"
fi
exec "${CMD[@]}"
