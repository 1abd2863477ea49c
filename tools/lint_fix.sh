#!/usr/bin/env bash
# Applies ruff's fixes and formatting to the whole tree (config: ruff.toml), then lists what is
# left for a person to fix; `make lint` passes when this prints nothing after "== left".
#   bash tools/lint_fix.sh            (RUFF=path/to/ruff to use another binary)
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF=${RUFF:-.venv/bin/ruff}
"$RUFF" check --fix --exit-zero --silent .   # safe fixes only: import order, unused imports, stale noqa
"$RUFF" format .
echo "== left (fix by hand, then run make lint)"
"$RUFF" check --output-format concise . || exit 1
