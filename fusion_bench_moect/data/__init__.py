"""Text for training and evaluation: the readers of sources (``text``: the Debian Reference,
user files; ``documents``: lazily read documents of a training source).

Nothing here imports torch or FusionBench, so the readers stay cheap to import.
"""
