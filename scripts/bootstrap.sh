#!/usr/bin/env bash
# Creates .venv with everything `make run` and `make test` need, on a fresh machine.
#
# llama-cpp-python must be built from source with the ggml RPC backend, and without
# llamafile's sgemm: with it, ggml's CPU backend computes a batch of tokens with other
# kernels than one token, so an answer resumed after an engine restart in one batched
# pass would drift from the text it would have written (docs/RECOVERY.md). pip's own
# wheel cache ignores CMAKE_ARGS and would silently hand back another build, so we keep
# our own wheelhouse keyed by version and flags, build with --no-cache-dir, and check
# the build after installing. A wheelhouse entry built otherwise is deleted and rebuilt.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
LLAMA_VERSION="${LLAMA_VERSION:-0.3.36}"
LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_RPC=ON -DGGML_LLAMAFILE=OFF}"
flags_key="$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
WHEELHOUSE="${ANYWAY_WHEELHOUSE:-$HOME/.cache/anyway/wheelhouse}/llama-cpp-python-${LLAMA_VERSION}-$(uname -m)-${flags_key}"
EXTRAS="${EXTRAS:-test}"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"' \
  || { log "Python 3.11 or newer is required (found $("$PYTHON" --version 2>&1))"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24" wheel setuptools

# Exit status: 0 RPC present and llamafile off, 3 built without RPC, 4 built with
# llamafile's sgemm, anything else: import failed.
rpc_check() {
  "$VENV/bin/python" - <<'PY'
import sys
try:
    import llama_cpp
except Exception as exc:  # missing dependency, broken build: not a verdict on RPC
    print(f"llama_cpp does not import: {exc}", file=sys.stderr)
    sys.exit(2)
if not llama_cpp.llama_supports_rpc():
    sys.exit(3)
sys.exit(4 if "LLAMAFILE = 1" in llama_cpp.llama_print_system_info().decode() else 0)
PY
}

installed_version() {
  "$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true
}

if [ "$(installed_version)" = "$LLAMA_VERSION" ] && rpc_check 2>/dev/null; then
  log "llama-cpp-python $LLAMA_VERSION with RPC already installed"
else
  mkdir -p "$WHEELHOUSE"
  wheel="$(ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    log "building llama-cpp-python $LLAMA_VERSION with CMAKE_ARGS='$LLAMA_CMAKE_ARGS' (about 5 minutes on 2 cores)"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$WHEELHOUSE" "llama-cpp-python==$LLAMA_VERSION"
    wheel="$(ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)"
  else
    log "reusing $wheel"
  fi
  # Dependencies come from the index; the package itself only from our wheel.
  "${PIP[@]}" install -q --force-reinstall --no-cache-dir "$wheel"
  status=0; rpc_check || status=$?
  if [ "$status" = 3 ] || [ "$status" = 4 ]; then
    log "the llama-cpp-python wheel $wheel was not built with $LLAMA_CMAKE_ARGS; deleting it. Run make again to rebuild."
    rm -f "$wheel"
    exit 1
  elif [ "$status" != 0 ]; then
    log "llama-cpp-python from $wheel does not import (see above)"
    exit 1
  fi
fi

log "installing anyway and its pinned dependencies"
"${PIP[@]}" install -q -e ".[${EXTRAS}]" "llama-cpp-python==$LLAMA_VERSION" --no-build-isolation
"$VENV/bin/python" -c 'import appliance, llama_cpp, zmq, fastapi, gguf; assert llama_cpp.llama_supports_rpc()' \
  || { log "installation check failed"; exit 1; }
log "ready: $VENV"
