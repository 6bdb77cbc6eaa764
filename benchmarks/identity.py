"""Byte identity of the build: 12 fixed configurations on tiny random models, one sha256 per
output file. Run it before and after a change that must not change behaviour; the two
outputs must be identical (``diff``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/identity.py > /tmp/identity-after.txt

The models come from the tests' tiny-model factory (``tests/helpers.py``'s ``make_tiny_model``,
the tests' ``tiny_model`` fixture: 3 layers, 9 heads / 3 KV heads, tied embeddings, seeded) and
its BPE tokenizer, saved under ``--root`` (fixed, as ``save_checkpoint`` is recorded in
``config.json``; wiped first). Five builds (Mixtral G1 and G4
with permutation, noise, drop and sources; Qwen2-MoE with sources, a shared expert of two FFNs
and prompt gates; Qwen3-MoE G2 and G4 with dense layers) each run through
``OrthogonalMoECTMergingAlgorithm(...).run(pool)`` with ``save_checkpoint``, in memory and
streamed (10), and two of them through the lean CLI (12). The in-memory runs also hash the
model ``run`` returns without ``save_checkpoint`` (``build_model``), as ``<state_dict>``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

#: name: (base family, number of sources, algorithm parameters).
BUILDS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "mixtral-g1": (
        "llama",
        2,
        dict(
            architecture="mixtral",
            permute_neurons=True,
            noise_scale=0.01,
            drop_ratio=0.25,
            dtype="bfloat16",
        ),
    ),
    "mixtral-g4": (
        "mistral",
        2,
        dict(
            architecture="mixtral",
            granularity=4,
            experts_per_token=4,
            gate_mode="random",
            permute_neurons=True,
            noise_scale={"ft1": 0.02},
            drop_ratio=0.5,
            dtype="float32",
        ),
    ),
    "qwen2_moe-sources": (
        "qwen2",
        2,
        dict(
            architecture="qwen2_moe",
            granularity=2,
            experts_per_token=2,
            shared_expert_share=0.3,
            shared_experts=["_pretrained_", {"source": "ft1", "residual_scale": 0.5}],
            residual_scale={"ft2": 0.5},
            gate_mode="cheap_embed",
            prompts={
                "_pretrained_": ["general text"],
                "ft1": ["the license terms"],
                "ft2": {"positive": ["free software"], "negative": ["warranty"]},
                "shared_expert": ["any text at all"],
            },
            dtype="bfloat16",
        ),
    ),
    "qwen3_moe-g2": (
        "qwen3",
        0,
        dict(
            architecture="qwen3_moe",
            num_experts=8,
            granularity=2,
            experts_per_token=2,
            moe_layers=[0, 2],
            dtype="bfloat16",
        ),
    ),
    "qwen3_moe-g4": (
        "qwen3",
        1,
        dict(
            architecture="qwen3_moe",
            granularity=4,
            experts_per_token=4,
            alpha_strategy="linear_increase",
            moe_layers="auto_from_alpha",
            dtype="float32",
        ),
    ),
}
#: The builds also run through the lean CLI (no prompt gates there).
CLI_BUILDS = ("mixtral-g1", "qwen3_moe-g2")


def make_models(root: Path, family: str, num_sources: int) -> dict[str, str]:
    """The seeded tiny base and its fine-tune stand-ins, saved; pool name -> directory."""
    from helpers import make_tiny_model, perturbed, save

    base = make_tiny_model(family, seed=0, layers=3)
    dirs = {"_pretrained_": save(base, root / family / "base")}
    for i in range(1, num_sources + 1):
        dirs[f"ft{i}"] = save(perturbed(base, seed=i), root / family / f"ft{i}")
    return dirs


def file_hashes(directory: Path) -> list[tuple[str, str]]:
    """(relative path, sha256) of every file under ``directory``, sorted."""
    return [
        (str(path.relative_to(directory)), hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]


def state_hash(model: Any) -> str:
    """sha256 over every (name, dtype, shape, bytes) of a model's state dict, sorted by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().contiguous().view(-1).view(dtype=_byte_dtype())
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def run_algorithm(name: str, dirs: dict[str, str], tok: Path, out: Path, streamed: bool) -> list:
    """One algorithm build; the hashes of its files (and, in memory, of ``build_model``)."""
    from helpers import pool

    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

    params = BUILDS[name][2]
    OrthogonalMoECTMergingAlgorithm(save_checkpoint=str(out), streaming=streamed, **params).run(
        pool(dirs, tokenizer=str(tok))
    )
    rows = file_hashes(out)
    if not streamed:
        model = OrthogonalMoECTMergingAlgorithm(**params).run(pool(dirs, tokenizer=str(tok)))
        rows.append(("<state_dict>", state_hash(model)))
    return rows


def run_cli(name: str, dirs: dict[str, str], tok: Path, out: Path) -> list:
    """One lean-CLI build (streamed); the hashes of its files."""
    from fusion_bench_moect.cli.upcycle import main

    argv = [dirs["_pretrained_"], str(out), "--tokenizer", str(tok), "-q"]
    argv += [f"--source={n}={d}" for n, d in dirs.items() if n != "_pretrained_"]
    for key, value in BUILDS[name][2].items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):
            argv.append(f"{flag}={','.join(f'{k}={v}' for k, v in value.items())}")
        elif isinstance(value, list):
            argv.append(f"{flag}={','.join(map(str, value))}")
        else:
            argv.append(f"{flag}={value}")
    if main(argv) != 0:
        raise SystemExit(f"lean CLI failed for {name}: {argv}")
    return file_hashes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/moect-identity"))
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.ERROR)
    from helpers import train_tokenizer

    shutil.rmtree(args.root, ignore_errors=True)
    tok = args.root / "tokenizer"
    train_tokenizer(tok)
    for name, (family, num_sources, _) in BUILDS.items():
        dirs = make_models(args.root / "models" / name, family, num_sources)
        runs = [("algorithm-in-memory", False), ("algorithm-streamed", True)]
        for label, streamed in runs:
            out = args.root / "out" / f"{name}-{label}"
            for file, digest in run_algorithm(name, dirs, tok, out, streamed):
                print(f"{name} {label}\t{file}\t{digest}", flush=True)
        if name in CLI_BUILDS:
            for file, digest in run_cli(name, dirs, tok, args.root / "out" / f"{name}-cli"):
                print(f"{name} lean-cli\t{file}\t{digest}", flush=True)


if __name__ == "__main__":
    main()
