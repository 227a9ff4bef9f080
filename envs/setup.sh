#!/usr/bin/env bash
# Create (or refresh) the two environments of rtdetr-parity inside the checkout:
#   .venvs/torch   — PyTorch (CPU build 2.13.0 here; set TORCH_SPEC for a CUDA build)
#   .venvs/jittor  — Jittor + jittor-offline (numpy<2)
# and OpenMPI from the system packages when missing (apt-get; Jittor's --nproc runs use mpirun).
# Idempotent: an env whose stamp matches the requested packages is left alone.
# Usage: bash envs/setup.sh [--only torch|jittor] [--python PY]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only=$2; shift 2;;
    --python) py=$2; shift 2;;
    -h|--help) sed -n 2,7p "$0"; exit 0;;
    *) echo "envs/setup.sh: unknown option '$1'" >&2; exit 2;;
  esac
done
venvs="$here/.venvs"
mkdir -p "$venvs"
light=(-r "$here/envs/requirements-common.txt")
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

make_env() {  # name, packages...
  local name=$1; shift
  local dir="$venvs/$name"
  local want; want=$(printf '%s\n' "$@" | cat - "$here/envs/requirements-common.txt" "$here/pyproject.toml" | sha1sum | cut -c1-12)
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$want" ]; then
    echo "[setup] $name env up to date ($dir)"
    return 0
  fi
  echo "[setup] building $name env in $dir"
  [ -x "$dir/bin/python" ] || "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$dir/bin/python" -m pip install -q "$@" "${light[@]}"
  "$dir/bin/python" -m pip install -q --no-deps -e "$here"
  echo "$want" > "$dir/.stamp"
}

# OpenMPI: Jittor's data-parallel runs (parity run --nproc N) start under mpirun, and Jittor
# builds its MPI ops with mpicc at import.  Installed from the system packages when missing
# (apt-get as root, or sudo without a password); otherwise said, and --nproc refuses the
# Jittor side with a one-line error.  SKIP_MPI=1 skips this step.
install_mpi() {
  if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; then
    echo "[setup] OpenMPI found: $(mpirun --version 2>/dev/null | head -1)"
    return 0
  fi
  local pkgs=(openmpi-bin libopenmpi-dev) sudo=()
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] OpenMPI missing and no apt-get here: install OpenMPI (mpirun, mpicc) for Jittor --nproc runs" >&2
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then sudo=(sudo -n); else
      echo "[setup] OpenMPI missing; installing it needs root: sudo apt-get install ${pkgs[*]} (Jittor --nproc runs need it)" >&2
      return 0
    fi
  fi
  echo "[setup] installing OpenMPI from the system packages: apt-get install ${pkgs[*]}"
  if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 \
      || { echo "[setup] apt-get could not install ${pkgs[*]}: Jittor --nproc runs will not start" >&2; return 0; }
  fi
  echo "[setup] OpenMPI installed: $(mpirun --version 2>/dev/null | head -1)"
}
if [ "${SKIP_MPI:-0}" != 1 ] && { [ -z "$only" ] || [ "$only" = jittor ]; }; then
  install_mpi
fi

if [ -z "$only" ] || [ "$only" = torch ]; then
  make_env torch "$TORCH_SPEC" "numpy"
fi
if [ -z "$only" ] || [ "$only" = jittor ]; then
  make_env jittor jittor jittor-offline "numpy<2"
  # Pre-warm Jittor's compile cache (first import compiles jittor_core, ~2.5 min on 2 cores).
  echo "[setup] warming Jittor compile cache (first time: a few minutes)"
  ( cd "$here" && "$venvs/jittor/bin/python" -c "from backends.jittor_impl.framework import jt; print('[setup] jittor', jt.__version__, 'ok')" ) \
    || { echo "[setup] Jittor failed to import in $venvs/jittor (rerun with JITTOR_VERBOSE=1 for details)" >&2; exit 1; }
fi
"$venvs/torch/bin/python" -c "import torch; print('[setup] torch', torch.__version__, 'ok')" 2>/dev/null || true
