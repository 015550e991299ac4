# Shared by scripts/serve and scripts/test: create or refresh .venv and the default models.
# Idempotent: a second run only checks stamps (about a second).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "multigen: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.multigen-installed"
# installed without its dependencies: spandrel requires torchvision (CUDA wheels, GBs), which multigen does not
# need (pipes/upscale.py); its other needs are pinned in setup.cfg
NO_DEPS="spandrel==0.4.2"
WANT="$( (cat setup.cfg pyproject.toml; echo "$NO_DEPS") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "multigen: installing into $VENV (first run takes a minute)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  "$VENV/bin/python" -m pip install -q --no-deps $NO_DEPS
  echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
MODELS="$ROOT/models"
if [ ! -f "$MODELS/.complete" ]; then
  "$VENV/bin/multigen" models init --rebuild --dir "$MODELS"
  touch "$MODELS/.complete"
elif [ ! -f "$MODELS/tiny-flux/model_index.json" ]; then
  # built before the Flux model existed: add it, leave the others alone
  "$VENV/bin/multigen" models init --dir "$MODELS"
fi
