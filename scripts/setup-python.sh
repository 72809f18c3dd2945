#!/usr/bin/env bash
# Creates (or reuses) the venv with the pinned packages, then converts the
# pretrained weights and gathers labels and sample photos (models/, data/).
# Idempotent: a second run with nothing to do takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TERN_VENV:-$PWD/.venv}"
# timm is read for its ImageNet class-name files only; --no-deps keeps
# torchvision out.
extra="timm==1.0.31"
want="$(cat scripts/requirements.txt; echo "--no-deps $extra")"
stamp="$venv/.tern-requirements"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating venv $venv"
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages (torch is about 4.7 GB; takes a few minutes)"
  "$venv/bin/pip" install --quiet --progress-bar off -r scripts/requirements.txt
  "$venv/bin/pip" install --quiet --progress-bar off --no-deps "$extra"
  printf '%s' "$want" > "$stamp"
fi
"$venv/bin/python" scripts/prepare_models.py
