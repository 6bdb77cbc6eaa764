#!/usr/bin/env bash
# Run the test suite under both transformers majors (5.x in .venv, 4.57 in .venv-tf4).
# Sets everything up first (idempotent). Extra arguments go to pytest.
# MOECT_MAJORS="5" runs one major only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tf4
majors=${MOECT_MAJORS:-"5 4"}
status=0
for major in $majors; do
  if [ "$major" = 5 ]; then venv=.venv other=.venv-tf4; else venv=.venv-tf4 other=.venv; fi
  version=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
  echo "== tests under transformers $version ($venv)"
  MOECT_OTHER_PYTHON="$PWD/$other/bin/python" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests || status=$?
done
exit $status
