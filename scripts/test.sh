#!/usr/bin/env bash
# Run the test suite: everything under transformers 5.x (.venv), and the tests marked
# cross_version (what depends on the major: layouts, checkpoints loaded under the other major,
# tokenizers, llama.cpp) under 4.57 (.venv-tf4); tests/README.md lists them.
# Sets everything up first (idempotent). Extra arguments go to pytest.
# MOECT_MAJORS="5" runs one major only; MOECT_FULL=1 runs everything under 4.57 too.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tf4
majors=${MOECT_MAJORS:-"5 4"}
status=0
for major in $majors; do
  if [ "$major" = 5 ]; then
    venv=.venv other=.venv-tf4 subset=()
  else
    venv=.venv-tf4 other=.venv subset=(-m cross_version)
    [ "${MOECT_FULL:-0}" = 1 ] && subset=()
  fi
  version=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
  echo "== tests under transformers $version ($venv)${subset[*]:+, ${subset[*]}}"
  start=$(date +%s)
  MOECT_OTHER_PYTHON="$PWD/$other/bin/python" "$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 \
    "${subset[@]}" "$@" tests || status=$?
  echo "== transformers $version: $(( $(date +%s) - start )) s"
done
exit $status
