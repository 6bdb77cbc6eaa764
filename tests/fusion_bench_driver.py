"""Run the real ``fusion_bench`` CLI several times in one process (importing FusionBench takes
~6 s per process), each run's whole output captured as a terminal would show it.

    python fusion_bench_driver.py JOBS.json

``JOBS.json`` holds ``[{"argv": [overrides...], "output": PATH}, ...]``. Each run's stdout and
stderr go, interleaved, to ``PATH`` (file descriptors 1 and 2 redirected, so everything any
library writes is there); its exit status goes to ``PATH.status``.
"""

from __future__ import annotations

import json
import os
import sys


def run_cli(argv: list[str], output: str) -> int:
    """The ``fusion_bench`` entry point on ``argv``; returns its exit status."""
    from fusion_bench.scripts.cli import _hydra_main

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(output, "wb") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        sys.argv = ["fusion_bench", *argv]
        try:
            _hydra_main()
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    for fd in saved:
        os.close(fd)
    return status


def main() -> None:
    for job in json.loads(open(sys.argv[1]).read()):
        status = run_cli(job["argv"], job["output"])
        with open(job["output"] + ".status", "w") as file:
            file.write(str(status))


if __name__ == "__main__":
    main()
