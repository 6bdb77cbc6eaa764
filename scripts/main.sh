#!/usr/bin/env bash
# The main job: upcycle SmolLM2-135M-Instruct (a real Llama model, from PyPI, offline) into an
# 8-expert Mixtral with orthogonal routers through the real `fusion_bench` CLI, and evaluate
# dense vs MoE perplexity plus routing statistics on English, German and French text.
# Sets everything up first (idempotent). Extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
log_dir="outputs/main/$(date +%Y-%m-%d_%H-%M-%S)"
.venv/bin/fusion_bench \
  method=moe_ct_upcycling method.num_experts=8 method.gate_mode=orthogonal \
  modelpool=smollm2_upcycle \
  taskpool=moe_text_perplexity \
  hydra.run.dir="$log_dir" path.log_dir="$log_dir" "$@"
echo
echo "Report: $log_dir/program_report.json"
ls "$log_dir"/*.png 2>/dev/null | sed 's/^/Plot:   /' || true
