#!/usr/bin/env bash
# Creates (or reuses) the venv with the pinned packages, then converts the
# pretrained weights and gathers labels and sample photos (models/, data/).
#
#   TERN_VENV         the venv (default: <repo>/.venv)
#   TERN_BASE_PYTHON  the interpreter that creates it (default: python3, 3.10+)
#
# Idempotent: the pinned lists are recorded in a stamp file inside the venv
# after a successful install, and a run whose stamp matches skips pip (a
# second run with nothing to do takes well under a second).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TERN_VENV:-$PWD/.venv}"
base="${TERN_BASE_PYTHON:-python3}"
timm="timm==1.0.31" # read for its ImageNet class-name files only; --no-deps keeps torchvision out
stamp="$venv/.tern-requirements"

# A venv whose interpreter no longer starts (its base Python was removed or
# upgraded) is made again from scratch; anything else in the way is refused.
if [ -f "$venv/pyvenv.cfg" ] && ! "$venv/bin/python" -c '' 2>/dev/null; then
  echo "setup: the python of $venv does not run; recreating the venv"
  rm -rf "$venv"
elif [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv" 2>/dev/null)" ]; then
  echo "setup: $venv exists and is not a venv; set TERN_VENV or remove it" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  command -v "$base" >/dev/null || { echo "setup: $base not found (set TERN_BASE_PYTHON)" >&2; exit 1; }
  "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { echo "setup: $base is $("$base" -V 2>&1); Python 3.10 or newer is needed" >&2; exit 1; }
  echo "setup: creating venv $venv with $("$base" -V 2>&1)"
  "$base" -m venv "$venv"
  rm -f "$stamp"
fi

want="$(
  "$venv/bin/python" -c 'import platform, sys; print(f"python {platform.python_version()} {sys.platform} {platform.machine()}")'
  cat scripts/requirements.txt scripts/constraints.txt
  echo "--no-deps $timm"
)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the pinned Python packages into $venv (torch with its CUDA wheels is about 5 GB; a few minutes the first time)"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
  "${pip[@]}" install --progress-bar off -q -r scripts/requirements.txt -c scripts/constraints.txt
  "${pip[@]}" install --progress-bar off -q --no-deps "$timm"
  printf '%s\n' "$want" > "$stamp.tmp"
  mv "$stamp.tmp" "$stamp"
fi
"$venv/bin/python" scripts/prepare_models.py
