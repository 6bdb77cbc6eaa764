"""Each output family answers for itself (issue 20): generic code asks ``arch`` and never
names a family; refusals name the families that can."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fusion_bench_moect import arch
from fusion_bench_moect.arch import ARCHITECTURES, check_supported, legacy_config_fields
from fusion_bench_moect.arch.qwen3_moe import Qwen3MoeArchitecture
from fusion_bench_moect.params import MoECTConfig

PACKAGE = Path(arch.__file__).resolve().parents[1]
#: Model types (also as config values) and transformers class names of every MoE family,
#: those still to come included.
FAMILY_NAMES = re.compile(r"mixtral|qwen2_moe|qwen3_moe|glm4_moe|Mixtral[A-Z]|Qwen[23]Moe|Glm4Moe")
#: Files outside ``arch/`` that must name a family, and why.
ALLOWED = {
    "_compat.py": "makes FusionBench's own Mixtral module importable under transformers 5",
    "algorithm.py": "subclasses FusionBench's MixtralForCausalLMMergingAlgorithm",
}


def family_names_in(path: Path) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FAMILY_NAMES.search(line)
    ]


def test_no_family_name_outside_arch():
    # the scan finds what it looks for
    assert family_names_in(PACKAGE / "arch" / "qwen2_moe.py")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("arch/") or any(relative.startswith(a) for a in ALLOWED):
            continue
        found += family_names_in(path)
    assert found == [], "ask the family (fusion_bench_moect/arch) instead:\n" + "\n".join(found)


def refusal(family: str, num_layers: int = 3, **params) -> str | None:
    """The message ``check_supported`` refuses ``params`` with (None: accepted); explicit
    ``moe_layers`` are taken as already resolved."""
    layers = params.get("moe_layers") or list(range(num_layers))
    try:
        check_supported(ARCHITECTURES[family](), MoECTConfig(**params), layers, num_layers)
    except ValueError as err:
        return str(err)
    return None


def test_refusals_name_the_families_that_can():
    assert refusal("mixtral", moe_layers=[0, 2]) == (
        "moe_layers: the mixtral output makes every layer MoE and cannot keep dense layers; "
        "use architecture: qwen2_moe or qwen3_moe, or leave moe_layers unset."
    )
    assert refusal("qwen3_moe", shared_experts=["_pretrained_"]) == (
        "shared_experts: the qwen3_moe output has no shared expert; use architecture: "
        "qwen2_moe or glm4_moe, or leave shared_experts unset."
    )
    assert refusal("mixtral", prompts={"shared_expert": ["x"]}) == (
        "prompts.shared_expert: sets the shared expert's gate, which the mixtral output has "
        "not; use architecture: qwen2_moe, or drop that entry."
    )
    everything = dict(
        moe_layers=[0, 2], shared_experts=["_pretrained_"], prompts={"shared_expert": ["x"]}
    )
    assert refusal("qwen2_moe", **everything) is None
    assert refusal("mixtral") is None


class ToyArchitecture(Qwen3MoeArchitecture):
    """A family added by one class and one registry entry: it keeps only the last layer MoE
    and has a shared expert without a gate."""

    name = "toy"
    has_shared_expert = True

    def dense_layers_reason(self, moe_layers, num_layers):
        return None if list(moe_layers) == [num_layers - 1] else "the toy output is odd"


def test_a_registered_family_is_asked_like_the_others(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "toy", ToyArchitecture)
    assert refusal("mixtral", shared_experts=["_pretrained_"]).startswith(
        "shared_experts: the mixtral output has no shared expert; use architecture: "
        "qwen2_moe, glm4_moe or toy, or"
    )
    assert refusal("toy", moe_layers=[2]) is None
    assert refusal("mixtral", moe_layers=[2]).endswith(
        "use architecture: qwen2_moe, qwen3_moe, glm4_moe or toy, or leave moe_layers unset."
    )
    assert refusal("toy", moe_layers=[0, 2]) == (
        "moe_layers: the toy output is odd; use architecture: qwen2_moe or qwen3_moe, or leave "
        "moe_layers unset."
    )
    assert "gate" in refusal("toy", prompts={"shared_expert": ["x"]})
    with pytest.raises(ValueError, match="toy output has no shared expert gate"):
        ToyArchitecture().shared_gate_init(4, None)


def test_legacy_config_fields_are_the_familys():
    rope = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    qwen = {"model_type": "qwen3_moe", "num_local_experts": 4, **rope}
    assert legacy_config_fields(qwen) == {"num_experts": 4, "rope_theta": 5e5}
    assert legacy_config_fields({**qwen, "model_type": "mixtral"}) == {"rope_theta": 5e5}
    assert legacy_config_fields({"model_type": "llama", "num_local_experts": 4}) == {}
