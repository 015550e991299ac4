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
WANT="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "multigen: installing into $VENV (first run takes a minute)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e ".[test]"
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
