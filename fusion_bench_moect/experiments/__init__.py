"""Experiment drivers, outside the core import path (nothing in the core imports them):

- ``leaderboard``: a grid of ``fusion_bench`` runs, ranked (docs/leaderboard.md);
- ``study``: the MoE-CT study, language experts -> merge grid -> collapse runs (docs/study.md).

Their command lines are ``fusion_bench_moect.cli.leaderboard`` and ``fusion_bench_moect.cli.study``.
"""
