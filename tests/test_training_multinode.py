"""Multi-node training as users launch it: the same ``fusion_bench`` command started once per
node with ``NODE_RANK`` (here two "nodes" of one CPU process each on this host) trains exactly
like two processes on one node, under both multi-process presets (``fabric=moe_fsdp2`` loads
sharded: each process reads its own rows; ``fabric=moe_ddp``). FusionBench's own default
fabric has no ``num_nodes`` key (docs/training.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_cli, train_cli_args, training_history, weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("preset", ["moe_fsdp2", "moe_ddp"])
def test_two_nodes_train_like_two_processes_on_one_node(
    preset, moe_checkpoint, tokenizer_dir, tmp_path
):
    moe_dir, _ = moe_checkpoint("mixtral")
    tok, fabric = str(tokenizer_dir), f"fabric={preset}"
    one = train_cli(tmp_path, tmp_path / "one", moe_dir, tok, fabric, devices=2)
    two = tmp_path / "two"
    args = train_cli_args(tmp_path, two, moe_dir, tok, fabric, "fabric.num_nodes=2", devices=1)
    port = str(free_port())
    command = [str(Path(sys.executable).parent / "fusion_bench"), *args]
    nodes = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                "NODE_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=600)
        assert node.returncode == 0, output[-3000:]
    reference, multi = weights(one), weights(two)
    assert set(reference) == set(multi)
    assert all(torch.equal(reference[k], multi[k]) for k in reference)
    assert training_history(one) == training_history(two)
