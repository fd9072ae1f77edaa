#!/usr/bin/env bash
# The serving engines' Python code (requirements/engines.txt), for tests that run moeplace's engine
# pieces through SGLang's and vLLM's own modules. A separate venv on top of the project venv (a .pth
# line makes torch, numpy and pydantic come from there), the engines installed --no-deps: none of
# their GPU dependencies. Idempotent, keyed by the pins and the base venv; wheels are cached.
#   scripts/engines-env.sh [BASE_VENV]    prints the engines venv's python
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-$HOME/.cache/moeplace/venv}
CACHE=$HOME/.cache/moeplace
ENV=$CACHE/engines-venv
WHEELS=$CACHE/engine-wheels
KEY=$( (cat requirements/engines.txt; echo "$BASE") | sha1sum | cut -c1-12)
STAMP=$ENV/.installed-$KEY
if [ ! -f "$STAMP" ]; then
  echo "engines-env: building $ENV (requirements/engines.txt)" >&2
  rm -rf "$ENV"
  "$BASE/bin/python" -m venv "$ENV"
  site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
  site "$BASE/bin/python" > "$(site "$ENV/bin/python")/moeplace-base.pth"
  mkdir -p "$WHEELS"
  "$ENV/bin/pip" download -q --no-deps -d "$WHEELS" -r requirements/engines.txt >&2
  "$ENV/bin/pip" install -q --no-deps --no-index --find-links "$WHEELS" -r requirements/engines.txt >&2
  touch "$STAMP"
fi
echo "$ENV/bin/python"
