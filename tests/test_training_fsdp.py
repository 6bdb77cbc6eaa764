"""The shipped Fabric presets: moe_fsdp wraps (and checkpoints) every MoE decoder layer,
moe_ddp is plain DDP. Lightning runs FSDP on GPUs only, so on the CPU the FSDP preset is
checked for construction and for the layers it wraps, not trained."""

from __future__ import annotations

import pytest
from conftest import make_model, pool
from hydra.utils import instantiate

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.inspection import decoder_layers


def compose(*overrides):
    from pathlib import Path

    import fusion_bench
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    root = Path(fusion_bench.__file__).resolve().parents[1] / "fusion_bench_config"
    with initialize_config_dir(str(root), version_base=None):
        return hydra_compose("fabric_model_fusion", overrides=list(overrides))


@pytest.mark.parametrize(
    "family, arch", [("llama", "mixtral"), ("llama", "qwen2_moe"), ("qwen3", "qwen3_moe")]
)
def test_fsdp_preset_wraps_and_checkpoints_every_moe_decoder_layer(saved, family, arch):
    from lightning.fabric.strategies import FSDPStrategy

    config = compose("fabric=moe_fsdp", "method=moe_ct_training")
    assert config.fabric.precision == "bf16-mixed"
    assert "TensorBoardLogger" in config.fabric.loggers._target_
    strategy = instantiate(config.fabric.strategy)
    assert isinstance(strategy, FSDPStrategy)
    wrapped = strategy._fsdp_kwargs["auto_wrap_policy"]
    moe = OrthogonalMoECTMergingAlgorithm(architecture=arch, dtype="float32").run(
        pool({"_pretrained_": saved(make_model(family))})
    )
    units = wrapped._run_policy(moe, ignored_modules=set(), root_kwargs={})
    # FSDP units: exactly the decoder layers (experts sharded within them); the root too
    assert set(units) - {moe} == set(decoder_layers(moe))
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert set(checkpointed._run_policy(moe, set(), {})) == set(units)


def test_ddp_preset_builds_a_data_parallel_fabric():
    config = compose("fabric=moe_ddp", "fabric.accelerator=cpu", "fabric.devices=1")
    assert config.fabric.strategy == "ddp" and config.fabric.precision == "bf16-mixed"
    fabric = instantiate(config.fabric, precision="32-true", loggers=None)
    assert type(fabric.strategy).__name__ == "DDPStrategy"
