#!/usr/bin/env bash
# Checks of the C++/CUDA extension, run by CI after `pip install --no-build-isolation -e .`:
#   1. aerl_fast._C imports and serves torch.ops.aerl_fast.grad_stats (not the torch fallback);
#   2. CMake build of csrc/ against the pip-installed libtorch + ctest (C++ test, load_library);
#   3. where nvcc exists: compile-only check of csrc/*.cu (and ops.cpp with the CUDA registration)
#      for sm_90, so a CUDA syntax or API error is caught on a machine without a GPU.
# Exits non-zero on the first failure. Env: JOBS (default 2), AERL_FAST_SKIP_CUDA_CHECK=1,
# AERL_FAST_BUILD_EXT=0 (extension deliberately not built: step 1 is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
PY="${PYTHON:-python}"
BUILD_DIR="build/ci-cmake"
mkdir -p "$BUILD_DIR"  # a fresh clone has no build/: the configure log is written beside it
t0=$SECONDS
step() { echo; echo "=== ext_checks: $* ($((SECONDS - t0)) s)"; }

step "1/3 aerl_fast._C is importable and grad_stats uses it"
if [ "${AERL_FAST_BUILD_EXT:-1}" = "0" ]; then
  echo "AERL_FAST_BUILD_EXT=0: extension not built by request; skipping"
else
  "$PY" - <<'PYEOF'
import torch
import aerl_fast._C as C
from aerl_fast.analysis import grad_stats, grad_stats_backend
assert grad_stats_backend("cpu") == "extension", grad_stats_backend("cpu")
out = grad_stats(torch.ones(2, 3), torch.ones(2, 3))
assert torch.allclose(out.norm, torch.full((2,), 3 ** 0.5)) and (out.cos == 1).all()
print(f"aerl_fast._C OK: openmp={C.openmp_enabled()} cuda_compiled={C.cuda_compiled()}")
PYEOF
fi

step "2/3 CMake build against pip libtorch + ctest"
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$(command -v "$PY")" \
  > "$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
echo "configured ($BUILD_DIR)"
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure

step "3/3 CUDA sources, compile-only"
NVCC="$(command -v nvcc || true)"
if [ "${AERL_FAST_SKIP_CUDA_CHECK:-0}" = "1" ]; then
  echo "AERL_FAST_SKIP_CUDA_CHECK=1: skipped"
elif [ -z "$NVCC" ]; then
  echo "nvcc not found: CUDA compile check skipped"
elif [ "$("$PY" -c 'import torch; print(torch.version.cuda or "")')" = "" ]; then
  echo "torch is a CPU build (no CUDA headers to compile against): CUDA compile check skipped"
else
  mapfile -t INC < <("$PY" - <<'PYEOF'
import os, torch
base = os.path.join(os.path.dirname(torch.__file__), "include")
print(base)
print(os.path.join(base, "torch", "csrc", "api", "include"))
PYEOF
  )
  OUT="$(mktemp -d)"
  trap 'rm -rf "$OUT"' EXIT
  NVCC_FLAGS=(-std=c++20 -O3 -arch=sm_90 -DAERL_FAST_WITH_CUDA -Xcompiler -fPIC
              -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
              -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
              --expt-relaxed-constexpr -DTORCH_EXTENSION_NAME=_C)
  for inc in "${INC[@]}"; do NVCC_FLAGS+=(-I"$inc"); done
  "$NVCC" --version | tail -1
  for cu in csrc/*.cu; do
    echo "nvcc -c $cu -arch=sm_90"
    "$NVCC" "${NVCC_FLAGS[@]}" -c "$cu" -o "$OUT/$(basename "$cu").o"
  done
  # ops.cpp with the CUDA registration branch enabled (host compiler, syntax only).
  echo "c++ -fsyntax-only -DAERL_FAST_WITH_CUDA csrc/ops.cpp"
  c++ -std=c++20 -fsyntax-only -DAERL_FAST_WITH_CUDA "${INC[@]/#/-I}" csrc/ops.cpp
  echo "CUDA sources compile"
fi

echo
echo "ext_checks: all passed in $((SECONDS - t0)) s"
