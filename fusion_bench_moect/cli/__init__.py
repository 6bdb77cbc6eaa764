"""The product's command lines (each also a console script, see pyproject.toml). The MoE-CT
study, research beside the product, has its own: ``python -m study`` (docs/study.md).

- ``python -m fusion_bench_moect.cli.upcycle`` (``moect-upcycle``): the lean CLI, dense
  safetensors directories in, MoE checkpoint out, without FusionBench.
- ``python -m fusion_bench_moect.cli.smollm2`` (``moect-smollm2``): prepare SmolLM2 offline.
- ``python -m fusion_bench_moect.cli.leaderboard`` (``moect-leaderboard``): a grid of
  ``fusion_bench`` runs, ranked (docs/leaderboard.md).
- ``python -m fusion_bench_moect.cli.convert_gguf`` (``moect-convert-gguf``): an output to
  GGUF with llama.cpp's own converter, the base's vocabulary kept (docs/interop.md).
"""
