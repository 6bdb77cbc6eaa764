"""Run ``moe_ct_training`` on a multi-process Lightning Fabric (CPU, gloo), for the tests.

Usage: ``python tests/fabric_worker.py SPEC.json``; SPEC holds ``moe_dir``, ``tokenizer``,
``params`` (the algorithm's), ``devices``, ``strategy`` and ``output`` (where rank 0 saves
the trained state dict and the history). Fabric's launcher re-runs this script for the
other ranks, as it re-runs ``fusion_bench`` on the command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from fusion_bench.modelpool import CausalLMPool

from fusion_bench_moect.training import MoECTTrainingAlgorithm

REPO = Path(__file__).resolve().parents[1]


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    strategy = spec["strategy"]
    if strategy == "moe_fsdp2":  # the shipped preset
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        strategy = instantiate(OmegaConf.load(REPO / "config/fabric/strategy/moe_fsdp2.yaml"))
    fabric = L.Fabric(
        accelerator="cpu", devices=spec["devices"], strategy=strategy, precision="32-true"
    )
    fabric.launch()
    algo = MoECTTrainingAlgorithm(**spec["params"])
    algo.fabric = fabric
    pool = CausalLMPool(
        models={"_pretrained_": spec["moe_dir"]},
        tokenizer=spec["tokenizer"],
        model_kwargs={"dtype": spec.get("dtype", "float32")},
    )
    model = algo.run(pool)
    if spec["strategy"] == "moe_fsdp2":  # the whole model, gathered on rank 0
        from fusion_bench_moect.training.sharding import full_state_dict

        states = [full_state_dict(model)]
    else:
        states = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    if spec["strategy"] == "ddp":  # every rank's weights, to show they agree
        gathered = [None] * fabric.world_size
        torch.distributed.all_gather_object(gathered, states[0])
        states = gathered
    # what each process read of the checkpoint while loading (0: the pool loaded it whole)
    read = [algo.bytes_loaded] * fabric.world_size
    if fabric.world_size > 1:
        torch.distributed.all_gather_object(read, algo.bytes_loaded)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    if fabric.is_global_zero:
        record = {"history": algo.history, "evaluations": algo.evaluations, "bytes_loaded": read}
        torch.save({"states": states, "dtypes": dtypes, **record}, spec["output"])
    fabric.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
