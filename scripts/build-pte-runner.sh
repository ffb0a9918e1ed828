#!/bin/sh
# Build deploy/executorch/pte_run.cpp against the executorch wheel's C++ runtime (headers and shared
# libraries in site-packages/executorch/{include,lib}; none of them links libtorch) into
# ${PTE_RUN:-var/bin/pte_run}. Needs g++ (`make compiler`). Rebuilt only when the source or the
# installed executorch changes.
set -eu
PY=${PY:-.venv/bin/python}
OUT=${PTE_RUN:-var/bin/pte_run}
SRC=deploy/executorch/pte_run.cpp
ROOT=$("$PY" -c 'import importlib.util; s = importlib.util.find_spec("executorch"); print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else "")')
if [ -z "$ROOT" ] || [ ! -d "$ROOT/include/executorch" ] || [ ! -f "$ROOT/lib/libexecutorch.so" ]; then
  echo "executorch's C++ runtime (include/ and lib/ of the executorch wheel) is missing: run 'make install'" >&2
  exit 1
fi
if [ -x "$OUT" ] && [ "$OUT" -nt "$SRC" ] && [ "$OUT" -nt "$ROOT/lib/libexecutorch.so" ]; then
  exit 0
fi
mkdir -p "$(dirname "$OUT")"
echo "building $OUT (ExecuTorch's C++ runtime, no torch)"
# --no-as-needed: the kernel and delegate libraries register themselves when loaded; nothing calls them by name.
"${CXX:-g++}" -std=c++17 -O2 -Wno-deprecated-declarations -o "$OUT.tmp" "$SRC" \
  -DC10_USING_CUSTOM_GENERATED_MACROS -DET_EVENT_TRACER_ENABLED -DET_USE_THREADPOOL \
  -I"$ROOT/include" -I"$ROOT/include/executorch/runtime/core/portable_type/c10" \
  -L"$ROOT/lib" -Wl,-rpath,"$ROOT/lib" -Wl,--no-as-needed \
  -lexecutorch -lexecutorch_backend_xnnpack -lexecutorch_kernels_optimized -lexecutorch_kernels_quantized \
  -lexecutorch_threadpool
mv "$OUT.tmp" "$OUT"
