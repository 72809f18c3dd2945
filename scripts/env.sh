# Sourced by the other scripts: where the venv is and how tch finds libtorch.
# libtorch is the one inside the PyPI torch wheel (torch 2.13.0 for tch 0.26).
TERN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TERN_ROOT
export TERN_VENV="${TERN_VENV:-$TERN_ROOT/.venv}"
export PATH="$TERN_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
if [ -x "$TERN_VENV/bin/python" ]; then
  torch_lib="$("$TERN_VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)"
  if [ -n "$torch_lib" ]; then
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
