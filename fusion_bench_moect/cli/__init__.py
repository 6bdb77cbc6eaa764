"""Command lines (each also a console script, see pyproject.toml):

- ``python -m fusion_bench_moect.cli.upcycle`` (``moect-upcycle``): the lean CLI, dense
  safetensors directories in, MoE checkpoint out, without FusionBench.
- ``python -m fusion_bench_moect.cli.smollm2`` (``moect-smollm2``): prepare SmolLM2 offline.
- ``python -m fusion_bench_moect.cli.leaderboard`` (``moect-leaderboard``): a grid of
  ``fusion_bench`` runs, ranked (docs/leaderboard.md).
- ``python -m fusion_bench_moect.cli.study`` (``moect-study``): the MoE-CT study (docs/study.md).
"""
