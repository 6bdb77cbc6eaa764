"""``python -m study`` (from the repository root): the MoE-CT study, see ``study/cli.py``."""

from .cli import main

raise SystemExit(main())
