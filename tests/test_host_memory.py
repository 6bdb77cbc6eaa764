"""glibc's mmap threshold fixed for training (training/host_memory.py): large freed blocks go
back to the system instead of staying resident under a live small one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# A fragmenting pattern, as a training step makes one: 16 MiB freed (glibc's threshold rises
# to it), then 2 MiB blocks with a 64 KiB live tensor after each; the big ones are freed.
SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from fusion_bench_moect.training.host_memory import give_back_freed_blocks

    def anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024

    fixed = give_back_freed_blocks() if sys.argv[1] == "fixed" else False
    block = torch.ones(4 << 20)  # 16 MiB
    del block
    before = anon_mib()
    big, small = [], []
    for _ in range(150):
        big.append(torch.ones(512 << 10))  # 2 MiB
        small.append(torch.ones(16 << 10))  # 64 KiB, from the heap's top
    del big
    print(json.dumps({"fixed": fixed, "kept_mib": anon_mib() - before}))
    """
)


def kept(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_go_back_to_the_system():
    default, fixed = kept("default"), kept("fixed")
    assert fixed["fixed"] is True
    print(f"300 MiB freed: {default['kept_mib']:.0f} MiB kept by default, "
          f"{fixed['kept_mib']:.0f} MiB with the threshold fixed")  # fmt: skip
    assert default["kept_mib"] > 250  # the allocator kept what was freed
    assert fixed["kept_mib"] < 20


def test_a_users_setting_wins(monkeypatch):
    from fusion_bench_moect.training.host_memory import ENV, give_back_freed_blocks

    monkeypatch.setenv(ENV, "4096")
    assert give_back_freed_blocks() is False
