#!/usr/bin/env bash
# Idempotent set-up: virtualenvs (transformers 5 in .venv, 4.57 in .venv-tf4), the package
# installed editable, Debian's parallel text, and the SmolLM2 model in the cache.
# Usage: scripts/setup.sh [--tf4] [--no-model] [--no-text] [--interop]
#   --interop: also what benchmarks/interop.py needs (implies --tf4): cmake, a C++ compiler and
#   ninja from apt when missing; sentencepiece for llama.cpp's GGUF converter,
#   which runs in .venv-tf4 (llama.cpp pins transformers 4.57); llama.cpp's sources (the
#   llama-cpp-python sdist, into $MOECT_LLAMA_CPP_DIR or the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_tf4=0 want_model=1 want_text=1 want_interop=0
for arg in "$@"; do
  case "$arg" in
    --tf4) want_tf4=1 ;;
    --no-model) want_model=0 ;;
    --no-text) want_text=0 ;;
    --interop) want_interop=1; want_tf4=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

pip_in() {  # pip_in VENV ARGS...: pip without this machine's noise about absent local indexes
  local venv=$1; shift
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}

make_venv() {  # make_venv DIR CONSTRAINTS
  local dir=$1 constraints=$2 stamp="$1/.moect-setup"
  local want; want=$(cat pyproject.toml "$constraints" constraints.txt | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "== setting up $dir ($constraints)"
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  pip_in "$dir" -c "$constraints" torch
  pip_in "$dir" -c "$constraints" -e ".[dev]"
  echo "$want" > "$stamp"
}

make_venv .venv constraints.txt
[ "$want_tf4" = 1 ] && make_venv .venv-tf4 constraints-tf4.txt

apt_install() {  # apt_install PACKAGES...: as root or through sudo, quietly
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ "$want_interop" = 1 ]; then
  tools=()
  command -v cmake >/dev/null || tools+=(cmake)
  command -v c++ >/dev/null || tools+=(g++)
  command -v ninja >/dev/null || tools+=(ninja-build)
  if [ ${#tools[@]} -gt 0 ]; then
    echo "== installing build tools for llama.cpp: ${tools[*]}"
    apt_install "${tools[@]}"
  fi
  pip_in .venv-tf4 -c constraints-tf4.txt "sentencepiece>=0.1.98,<0.3"
  # llama.cpp's sources (the converter; interop.py builds from them): once, into the cache.
  .venv/bin/python -c "from fusion_bench_moect.assets.llama_cpp import fetch_llama_cpp as f; f()"
fi

if [ "$want_text" = 1 ]; then
  missing=()
  for lang in en de fr es it; do
    [ -d "/usr/share/doc/debian-reference-$lang" ] || missing+=("debian-reference-$lang")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian's parallel text: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
fi

if [ "$want_model" = 1 ]; then
  .venv/bin/python -m fusion_bench_moect.cli.smollm2
fi
