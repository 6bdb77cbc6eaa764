"""The MoE-CT study (docs/study.md): language experts from SmolLM2, a merge grid
(forgetting vs plasticity), and expert collapse under continued training.

Reproduce everything with ``python -m study`` (``--quick`` for a smoke
run). Parts: ``experts`` (language experts), ``grid`` (merge grid), ``collapse``
(continued-training runs per gate mode), ``report`` (tables, plots, docs/study.md).
"""
