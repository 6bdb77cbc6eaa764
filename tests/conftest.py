"""Shared fixtures: tiny real transformers models and tokenizers saved to temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GPL = Path("/usr/share/common-licenses/GPL-3")
VOCAB = 320  # byte ids (< 256) plus room for the tiny BPE tokenizer


def real_text() -> str:
    """Real English prose shipped by Debian (base-files), with a fallback sentence."""
    if GPL.is_file():
        return GPL.read_text()[:4000]
    return "The GNU General Public License is a free, copyleft license for software. " * 40


@pytest.fixture(scope="session")
def real_ids() -> torch.Tensor:
    """Real text as byte-level token ids, shape (2, 24)."""
    data = list(real_text().encode("utf-8")[:48])
    return torch.tensor(data, dtype=torch.long).view(2, 24)


def tiny_config(family: str, layers: int = 2, **overrides):
    """A tiny config with real-model quirks: 9 heads / 3 KV heads (GQA), tied embeddings."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=72,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    return cls(**common)


def make_model(family: str, seed: int = 0, layers: int = 2, **overrides):
    """A tiny causal LM with random weights; Qwen2 biases are made non-zero."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


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


def save(model, directory: Path) -> str:
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def saved(tmp_path):
    """Save a model into a fresh sub-directory and return its path."""
    counter = iter(range(10_000))

    def _save(model, name: str | None = None) -> str:
        return save(model, tmp_path / (name or f"model_{next(counter)}"))

    _save.root = tmp_path
    return _save


def pool(models: dict, tokenizer=None, **kwargs):
    from fusion_bench.modelpool import CausalLMPool

    return CausalLMPool(models=models, tokenizer=tokenizer, **kwargs)


def train_tokenizer(directory: Path, vocab_size: int = VOCAB, extra: str = ""):
    """A real byte-level BPE tokenizer trained on Debian's GPL text, saved to ``directory``."""
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


def in_ci() -> bool:
    return bool(os.environ.get("CI"))
