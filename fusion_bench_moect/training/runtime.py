"""What ran: the Fabric's strategy, processes, nodes, accelerator, precision and
mixed-precision policy, recorded with the trained model (``config.moe_ct_training.run``;
``params`` gets the accelerator and precision that ran).

Through ``fusion_bench`` these come from the program's Fabric (``fabric.*``), not from the
method's ``accelerator`` and ``precision`` parameters (which only the Python API uses), so
the record reads them from the Fabric that trained.
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: Fabric's mixed precisions: (compute dtype under autocast, weight dtype).
_FABRIC_MIXED = {"bf16-mixed": ("bfloat16", "float32"), "16-mixed": ("float16", "float32")}


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def mixed_precision(precision: str, module: nn.Module) -> dict[str, Any] | None:
    """The mixed-precision policy in force: FSDP2's (on the sharded root module) or Fabric's
    precision plugin's; None when everything computes in the weights' own dtype."""
    fsdp_state = getattr(module, "_get_fsdp_state", None)
    policy = getattr(fsdp_state(), "_mp_policy", None) if fsdp_state is not None else None
    if policy is not None and policy.param_dtype is not None:
        return {
            "by": "fsdp2",
            "param_dtype": _dtype_name(policy.param_dtype),
            "reduce_dtype": _dtype_name(policy.reduce_dtype),
        }
    if precision in _FABRIC_MIXED:
        compute, weights = _FABRIC_MIXED[precision]
        return {"by": "fabric", "compute_dtype": compute, "weight_dtype": weights}
    return None


def run_record(fabric: Any, module: nn.Module) -> dict[str, Any]:
    """Strategy, processes, nodes, accelerator, precision and mixed-precision policy of the
    Fabric that trained ``module`` (its Fabric-unwrapped model)."""
    strategy = fabric.strategy
    precision = str(getattr(strategy.precision, "precision", "32-true"))
    return {
        "strategy": type(strategy).__name__,
        "sharded": getattr(module, "_get_fsdp_state", None) is not None,
        "processes": int(fabric.world_size),
        "nodes": int(getattr(strategy, "num_nodes", 1)),
        "accelerator": fabric.device.type,
        "precision": precision,
        "mixed_precision": mixed_precision(precision, module),
    }


def training_record(params: dict[str, Any], fabric: Any, module: nn.Module) -> dict[str, Any]:
    """``params`` with ``accelerator`` and ``precision`` as they ran, and ``run``."""
    ran = run_record(fabric, module)
    return {
        "params": {**params, "accelerator": ran["accelerator"], "precision": ran["precision"]},
        "run": ran,
    }
