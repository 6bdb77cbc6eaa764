"""Plain helpers shared by several test modules (fixtures live in conftest.py).

Test modules import these (``from helpers import ...``), never ``conftest`` or another test
module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
GPL = Path("/usr/share/common-licenses/GPL-3")
VOCAB = 320  # byte ids (< 256) plus room for the tiny BPE tokenizer


#: Builds that the in-memory, streamed and mapped paths must agree on: family, architecture,
#: dtype, extra algorithm parameters.
BUILD_CASES = [
    ("llama", "mixtral", "bfloat16", {}),
    ("mistral", "mixtral", "float32", {"drop_ratio": 0.25, "noise_scale": 0.01}),
    ("llama", "qwen2_moe", "bfloat16", {"residual_scale": {"ft": 0.5}}),
    ("qwen2", "qwen2_moe", "float32", {"permute_neurons": True}),
    ("qwen3", "qwen3_moe", "bfloat16", {"alpha_strategy": "linear_increase"}),
    ("qwen3", "glm4_moe", "bfloat16", {"n_group": 2, "moe_layers": [1, 2], "drop_ratio": 0.25}),
    ("llama", "glm4_moe", "float32", {"shared_experts": ["ft", "_pretrained_"]}),
]

#: FusionBench merging configs for ``non_expert_merge`` (tests and benchmarks/non_expert.py).
MERGE_SIMPLE = {"_target_": "fusion_bench.method.SimpleAverageAlgorithm"}
MERGE_WEIGHTED = {
    "_target_": "fusion_bench.method.WeightedAverageAlgorithm",
    "normalize": True,
    "weights": [0.3, 0.7],
}
MERGE_TASK_ARITHMETIC = {
    "_target_": "fusion_bench.method.TaskArithmeticAlgorithm",
    "scaling_factor": 0.3,
}
MERGE_TIES = {
    "_target_": "fusion_bench.method.TiesMergingAlgorithm",
    "scaling_factor": 0.5,
    "threshold": 20,
    "remove_keys": [],
    "merge_func": "sum",
}


def in_ci() -> bool:
    """Whether the tests run in CI (``CI`` set), where nothing may be skipped for lack of it."""
    return bool(os.environ.get("CI"))


def unavailable(reason: str) -> None:
    """Skip the test for lack of ``reason``'s resource, or fail it in CI, which provides all."""
    if in_ci():
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def real_text() -> str:
    """Real English prose shipped by Debian (base-files), with a fallback sentence."""
    if GPL.is_file():
        return GPL.read_text()[:4000]
    return "The GNU General Public License is a free, copyleft license for software. " * 40


#: Real-model quirks: 9 heads / 3 KV heads (GQA), head_dim 8, tied embeddings.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=72,
    intermediate_size=64,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=128,
)
#: Routing of the MoE families: 4 experts, top-2 (Qwen: fine-grained experts, a shared one).
_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}
_CONFIGS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
}


def make_tiny_model(family: str, seed: int = 0, layers: int = 2, **overrides):
    """A tiny causal LM of ``family`` with random weights; biases (Qwen2) are made non-zero.

    Tests take it as the ``tiny_model`` fixture; benchmarks (``benchmarks/identity.py``) call
    it to build the same models.
    """
    settings = {**_COMMON, **_MOE.get(family, {}), "num_hidden_layers": layers, **overrides}
    config = getattr(transformers, _CONFIGS[family])(**settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


def save(model, directory: Path) -> str:
    """``model.save_pretrained(directory)``; the directory as a string."""
    model.save_pretrained(directory)
    return str(directory)


def perturbed(model, seed: int, scale: float = 0.05, ffn_only: bool = True):
    """A 'fine-tune' of ``model``: same architecture, FFN weights nudged."""
    import copy

    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if ".mlp." in name or not ffn_only:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    return clone


def pool(models: dict, tokenizer=None, **kwargs):
    """A FusionBench ``CausalLMPool`` of saved models."""
    from fusion_bench.modelpool import CausalLMPool

    return CausalLMPool(models=models, tokenizer=tokenizer, **kwargs)


def train_tokenizer(directory: Path, vocab_size: int = VOCAB, extra: str = ""):
    """A real byte-level BPE tokenizer trained on Debian's GPL text, saved to ``directory``.

    The ``tokenizer_dir`` fixture is the default one; call this for another vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tok.train_from_iterator([real_text() + extra], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


def add_tokenizer(tokenizer_dir: Path, directory: str | Path) -> None:
    """Copy the tokenizer files of ``tokenizer_dir`` (the fixture) into a model ``directory``."""
    shutil.copytree(tokenizer_dir, directory, dirs_exist_ok=True)


def max_diff(a, b, ids) -> float:
    """Max |logit difference| of two models on ``ids`` (float32)."""
    with torch.no_grad():
        return (a(ids).logits.float() - b(ids).logits.float()).abs().max().item()


def expert_stacks(moe, layer: int):
    """(gate, up, down) stacks (E, I_e, H), (E, I_e, H), (E, H, I_e) in either transformers layout."""
    from fusion_bench_moect.inspection import expert_triples, moe_block

    triples = list(expert_triples(moe_block(moe.model.layers[layer])))
    return tuple(torch.stack(parts) for parts in zip(*triples, strict=True))


RELOAD = """
import sys, torch, transformers
from transformers import AutoModelForCausalLM
key = "torch_dtype" if transformers.__version__.startswith("4.") else "dtype"
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **{key: "auto"}).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(type(model).__name__, model.dtype)
"""


def reload_logits(directory: Path, ids: torch.Tensor, tmp_path: Path, python: str = sys.executable):
    """The logits of the checkpoint in ``directory`` on ``ids``, loaded by ``python`` in a fresh
    process (another transformers major when given), and what it printed."""
    torch.save(ids, tmp_path / "ids.pt")
    out = subprocess.run(
        [python, "-c", RELOAD, str(directory), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(tmp_path / "out.pt"), out.stdout


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, by name."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def reload(directory: Path):
    """A checkpoint loaded in this process, in its saved dtype."""
    import transformers
    from transformers import AutoModelForCausalLM

    key = "torch_dtype" if transformers.__version__.startswith("4.") else "dtype"
    return AutoModelForCausalLM.from_pretrained(directory, **{key: "auto"}).eval()


def fusion_bench(
    cwd: Path, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real ``fusion_bench`` CLI of this interpreter's environment; it must succeed."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "fusion_bench"), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out


def train_cli(cwd: Path, out: Path, moe_dir, tokenizer, *overrides: str, **options) -> Path:
    """``fusion_bench method=moe_ct_training`` with ``train_cli_args``; returns ``out``."""
    fusion_bench(cwd, *train_cli_args(cwd, out, moe_dir, tokenizer, *overrides, **options))
    return out


def train_cli_args(
    cwd: Path,
    out: Path,
    moe_dir,
    tokenizer,
    *overrides: str,
    devices: int = 1,
    learning_rate: float = 1e-2,
    log_dir: Path | None = None,
) -> list[str]:
    """``fusion_bench`` overrides for 4 experts-stage steps on ``devices`` CPU processes on
    real text (``cwd/corpus.txt``, written here), saved to ``out``; TensorBoard logs only with
    ``log_dir``."""
    corpus = cwd / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(real_text())
    loggers = [f"path.log_dir={log_dir}"] if log_dir else ["fabric.loggers=null"]
    return [
        "method=moe_ct_training",
        "method.stage=experts",
        "method.max_steps=4",
        "method.batch_size=2",
        "method.seq_len=32",
        f"method.learning_rate={learning_rate}",
        "~method.train_sources",  # replace the default sources, not merge with them
        f"+method.train_sources={{corpus:'{corpus}'}}",
        f"method.save_checkpoint={out}",
        "modelpool=CausalLMPool/moe_ct_upcycle",
        f"modelpool.models._pretrained_={moe_dir}",
        f"modelpool.tokenizer={tokenizer}",
        "modelpool.model_kwargs.dtype=float32",
        "taskpool=dummy",
        "fabric.accelerator=cpu",
        f"fabric.devices={devices}",
        *loggers,
        f"hydra.run.dir={log_dir or out.with_name(out.name + '-logs')}",
        *overrides,
    ]


def report(log_dir: Path) -> dict:
    """The ``program_report.json`` a ``fusion_bench`` run wrote."""
    return json.loads((log_dir / "program_report.json").read_text())


# -- training on a multi-process Fabric, and what trained runs leave -------------------------

WORKER = Path(__file__).with_name("fabric_worker.py")


def training_params(**extra) -> dict:
    """``moe_ct_training`` settings of the multi-process tests: 3 experts-stage steps on real
    text, one warm-up step."""
    return {
        "train_sources": {"gpl": {"text": real_text()}},
        "stage": "experts",
        "max_steps": 3,
        "batch_size": 2,
        "seq_len": 32,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        **extra,
    }


def run_fabric(tmp_path: Path, moe_dir, tok, devices: int, strategy: str, **extra) -> dict:
    """Train ``moe_dir`` on ``devices`` CPU processes (``tests/fabric_worker.py``); returns
    rank 0's record: ``states`` (every rank's under DDP), ``history``, ``evaluations``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = {
        "moe_dir": moe_dir,
        "tokenizer": tok,
        "params": training_params(**extra),
        "devices": devices,
        "strategy": strategy,
        "output": str(tmp_path / f"{strategy}{devices}.pt"),
    }
    spec_path = tmp_path / f"{strategy}{devices}.json"
    spec_path.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, str(WORKER), str(spec_path)],
        capture_output=True,
        text=True,
        timeout=600,
        # the tests' helpers, and this checkout's package before an installed one
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (WORKER.parent, REPO)))},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return torch.load(spec["output"], weights_only=False)


def train_moe(moe_dir, tok, **params):
    """Continual training of a saved MoE through a FusionBench pool, in this process: 3 steps
    of 2 x 32 tokens at lr 1e-2 unless ``params`` say otherwise; the algorithm and the model."""
    from fusion_bench_moect.training import MoECTTrainingAlgorithm

    settings = {
        "train_sources": {"gpl": {"text": real_text()}},
        "max_steps": 3,
        "batch_size": 2,
        "seq_len": 32,
        "learning_rate": 1e-2,
        "accelerator": "cpu",
    }
    algo = MoECTTrainingAlgorithm(**{**settings, **params})
    models = {"_pretrained_": moe_dir}
    return algo, algo.run(pool(models, tokenizer=str(tok), model_kwargs={"dtype": "float32"}))


def run_local(moe_dir, tok, **extra):
    """The multi-process tests' training (``training_params``) in this process; the algorithm
    and a copy of the trained state."""
    from fusion_bench_moect.training import MoECTTrainingAlgorithm

    algo = MoECTTrainingAlgorithm(accelerator="cpu", **training_params(**extra))
    model = algo.run(
        pool({"_pretrained_": moe_dir}, tokenizer=tok, model_kwargs={"dtype": "float32"})
    )
    return algo, {k: v.detach().clone() for k, v in model.state_dict().items()}


def local_train(moe_dir, tok, **extra):
    """Two router-stage steps in this process; returns the algorithm and the trained model."""
    from fusion_bench_moect.training import MoECTTrainingAlgorithm

    settings = {
        "train_sources": {"gpl": {"text": real_text()}},
        "stage": "router",
        "max_steps": 2,
        "batch_size": 2,
        "seq_len": 32,
        "accelerator": "cpu",
        **extra,
    }
    algo = MoECTTrainingAlgorithm(**settings)
    return algo, algo.run(pool({"_pretrained_": moe_dir}, tokenizer=tok))


def trainable_key(key: str) -> bool:
    """Whether an experts-stage run trains this state-dict entry (routers, routed experts)."""
    return ("gate.weight" in key or ".experts." in key) and "shared_expert" not in key


def with_state(model, state: dict):
    """A copy of ``model`` holding ``state``."""
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone


def timeless(history: list[dict]) -> list[dict]:
    """A history without its wall-clock measure (tokens/s)."""
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model directory (safetensors), by name."""
    from safetensors.torch import load_file

    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


def training_history(directory: Path) -> dict:
    """A trained checkpoint's ``training_history.json``, without wall-clock measures."""
    saved = json.loads((directory / "training_history.json").read_text())
    return {"train": timeless(saved["train"]), "eval": saved["eval"]}
