"""``model.generate`` through :class:`~kvarn.integrations.cuda_graph.GraphDecoder` when that gives
the same result: no change to the caller's code.

::

    with kvarn.graph_generation(model):           # or: kvarn.enable(model, graph_generate=True)
        out = model.generate(**inputs, past_key_values=kvarn.KVarNCache(config=model.config),
                             max_new_tokens=256)
    kvarn.last_generate_path(model)               # GeneratePath(use_graph=True, reason=..., stats=...)

The patched ``generate`` resolves the call's options as transformers does (the call's keywords,
then ``generation_config`` / ``model.generation_config``, then transformers' global defaults,
e.g. ``top_k=50``; ``max_new_tokens`` over ``max_length``; ``pad_token_id`` defaulting to the
first ``eos_token_id``; an attention mask inferred from ``pad_token_id`` when none is given) and
takes the graph path only when every option is one GraphDecoder implements (greedy or sampled
with temperature / top-k / top-p / min-p, stop tokens, left padding), the cache is an empty
KVarNCache of KVarN layers only, and the device can replay it. Anything else goes to the original
``generate``, untouched. :func:`decide_generate_path` is the decision on its own.

Sampled tokens come from the same distribution as ``model.generate(do_sample=True)`` but not from
the same random numbers: GraphDecoder draws with its own ``generator`` (``graph_generation(model,
generator=...)``; ``None``: torch's default generator of the device). A fallback samples as
transformers does, from torch's global generator.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig

from kvarn.cache.cache import KVarNCache
from kvarn.cache.layer import KVarNLayer
from kvarn.integrations import cuda_graph
from kvarn.integrations.sampling import SamplingConfig
from kvarn.integrations.transformers import ATTN_NAME

logger = logging.getLogger(__name__)

# Resolved generation-config fields GraphDecoder implements (read into the plan below).
SUPPORTED_FIELDS = frozenset(
    {
        "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
        "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
    }
)  # fmt: skip
# Fields that change nothing in greedy or sampled decoding without beams, assistant or compile.
INERT_FIELDS = frozenset(
    {"transformers_version", "_from_model_config", "_commit_hash", "compile_config", "disable_compile",
     "early_stopping", "length_penalty"}
)  # fmt: skip
# generate's own keyword parameters: what each must be for the graph path (None or empty).
_CALL_PARAMETERS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
    "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate",
)  # fmt: skip
_MISSING = object()


@dataclass
class GeneratePath:
    """What the last patched ``generate`` call did: ``use_graph`` (GraphDecoder or the original),
    ``reason`` (why), ``stats`` (the GraphDecoder's :class:`GraphDecodeStats` on the graph path)."""

    use_graph: bool
    reason: str
    stats: cuda_graph.GraphDecodeStats | None = None


@dataclass
class _Plan:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: KVarNCache
    max_new_tokens: int
    eos_token_id: list[int] | None
    pad_token_id: int | None
    sampling: dict = field(default_factory=dict)


class _Fallback(Exception):  # noqa: N818 - control flow inside the decision, never escapes it
    pass


def _reference_config() -> GenerationConfig:
    """What an empty call resolves to without any model defaults."""
    config = GenerationConfig()
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return config


def _is_neutral(value, reference) -> bool:
    if value is None:
        return True  # every processor / criterion / mode is off when its option is None
    try:
        return bool(value == reference) or (not value and not reference)
    except (RuntimeError, TypeError, ValueError):  # tensors and other odd values: not neutral
        return False


def _token_list(value, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    tokens = [value] if isinstance(value, int) else list(value)
    if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise _Fallback(f"{name}={value!r} (not non-negative token ids)")
    return tokens


def _original_generate(model):
    current = model.generate
    return getattr(current, "__kvarn_original__", current)


def _check_call(arguments: dict) -> dict:
    for name in _CALL_PARAMETERS:
        value = arguments.get(name)
        if name in ("logits_processor", "stopping_criteria") and value is not None and len(value) == 0:
            continue  # an empty list adds nothing
        if value is not None and value is not False:
            raise _Fallback(f"{name} is given")
    extra = dict(arguments.get("kwargs", {}))
    extra.pop("tokenizer", None)  # only stop_strings and token_healing use it (both fall back)
    if extra.get("assistant_tokenizer") is not None:
        raise _Fallback("assistant_tokenizer is given")
    extra.pop("assistant_tokenizer", None)
    if extra.get("trust_remote_code") is not None:
        raise _Fallback("trust_remote_code is given")
    return extra


def _check_config(gen_config: GenerationConfig) -> None:
    reference = _reference_config()
    for name, value in sorted(vars(gen_config).items()):
        if name in SUPPORTED_FIELDS or name in INERT_FIELDS or name.startswith("_"):
            continue
        if not _is_neutral(value, getattr(reference, name, None)):
            raise _Fallback(f"{name}={value!r}")
    if gen_config.use_cache is False:
        raise _Fallback("use_cache=False")


def _check_cache(model, cache) -> KVarNCache:
    if cache is None:
        raise _Fallback("no past_key_values (pass an empty kvarn.KVarNCache)")
    if not isinstance(cache, KVarNCache):
        raise _Fallback(f"past_key_values is a {type(cache).__name__}, not a KVarNCache")
    others = [type(layer).__name__ for layer in cache.layers if not isinstance(layer, KVarNLayer)]
    if others:
        raise _Fallback(f"the KVarNCache has {len(others)} {others[0]} layer(s) (sliding window)")
    if any(layer.is_initialized for layer in cache.layers):
        raise _Fallback("a non-empty KVarNCache (it already holds tokens)")
    layers = getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", None)
    if layers is not None and layers != len(cache.layers):
        raise _Fallback(f"the KVarNCache has {len(cache.layers)} layers, the model {layers}")
    return cache


def _prompt(inputs, model_kwargs: dict) -> torch.Tensor:
    ids = model_kwargs.pop("input_ids", None)
    if inputs is not None and ids is not None:
        raise _Fallback("both inputs and input_ids are given")
    ids = inputs if ids is None else ids
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype != torch.long or ids.shape[1] == 0:
        raise _Fallback("the inputs are not a non-empty 2-D int64 input_ids tensor")
    return ids


def _mask(ids, mask, eos: list[int] | None, pad: int | None) -> torch.Tensor:
    if mask is None:  # as _prepare_attention_mask_for_generation infers it
        infer = pad is not None and bool((ids == pad).any()) and (eos is None or pad not in eos)
        mask = ids.ne(pad).long() if infer else torch.ones_like(ids)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise _Fallback("attention_mask is not a 2-D mask of input_ids' shape")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise _Fallback("attention_mask holds values other than 0 and 1")
    if not bool(mask[:, -1].all()):
        raise _Fallback("right padding (a row's last prompt token is masked)")
    return mask.long()


def _new_tokens(model, gen_config: GenerationConfig, has_default_max_length: bool, prompt: int) -> int:
    """What _prepare_generated_length makes of max_new_tokens / max_length."""
    if gen_config.max_new_tokens is not None:
        max_length = gen_config.max_new_tokens + prompt
    elif has_default_max_length:
        max_length = gen_config.max_length + prompt
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None:
            max_length = min(max_length, positions)
    else:
        max_length = gen_config.max_length
    if max_length is None or max_length <= prompt:
        raise _Fallback(f"max_length={max_length} leaves no new token for a {prompt}-token prompt")
    return max_length - prompt


def _sampling(gen_config: GenerationConfig) -> dict:
    """GraphDecoder's options for the warpers _get_logits_processor adds."""
    if not gen_config.do_sample:
        return {}
    top_k, top_p = gen_config.top_k, gen_config.top_p
    options = dict(
        do_sample=True,
        temperature=1.0 if gen_config.temperature is None else gen_config.temperature,
        top_k=None if not top_k else top_k,
        top_p=None if top_p is None or top_p >= 1.0 else top_p,
        min_p=gen_config.min_p,
    )
    try:
        SamplingConfig(**options)
    except ValueError as error:
        raise _Fallback(f"sampling options GraphDecoder refuses: {error}") from None
    return options


def _check_device(model, plan: _Plan, on_cpu: bool, generator) -> None:
    device = plan.input_ids.device
    if device.type == "cpu":
        if not on_cpu:
            raise _Fallback("CPU (the graph path runs on CPU only when forced: on_cpu=True)")
    elif device.type != "cuda":
        raise _Fallback(f"device {device} (CUDA graphs need CUDA)")
    model_device = getattr(model, "device", device)
    if torch.device(model_device).type != device.type:
        raise _Fallback(f"the inputs are on {device}, the model on {model_device}")
    if generator is not None:
        where = torch.device(generator.device)
        if where.type != device.type:
            raise _Fallback(f"the generator is on {where}, the inputs on {device}")
    if device.type == "cuda":
        reason = _cuda_unsupported_reason(model, plan, generator)
        if reason is not None:
            raise _Fallback(reason)


def _cuda_unsupported_reason(model, plan: _Plan, generator) -> str | None:
    """What GraphDecoder would refuse on CUDA, asked before anything runs."""
    reason = cuda_graph.kernel_unsupported_reason(model, plan.cache, plan.input_ids.device)
    if reason is not None:
        return reason
    sampled = plan.sampling and not SamplingConfig(**plan.sampling).greedy
    if sampled and generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"a generator in a CUDA graph needs CUDAGraph.register_generator_state (torch {torch.__version__})"
    return None


def _resolve(model, generate, args, kwargs, on_cpu: bool, generator) -> tuple[bool, str, _Plan | None]:
    try:
        try:
            arguments = inspect.signature(generate).bind(*args, **kwargs).arguments
        except TypeError as error:
            raise _Fallback(f"arguments generate does not take: {error}") from None
        extra = _check_call(arguments)
        if getattr(model.config, "is_encoder_decoder", False):
            raise _Fallback("an encoder-decoder model")
        if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
            raise _Fallback("the model is not on the kvarn attention (kvarn.enable(model))")
        if extra.get("cache_implementation") is not None:
            raise _Fallback(f"cache_implementation={extra['cache_implementation']!r}")
        passed_config = arguments.get("generation_config")
        has_default_max_length = (
            extra.get("max_length") is None
            and (passed_config is None or passed_config.max_length is None)
            and model.generation_config.max_length is None
        )
        try:
            gen_config, model_kwargs = model._prepare_generation_config(passed_config, **extra)
        except Exception as error:  # the original raises it again
            raise _Fallback(f"the generation config does not resolve: {error}") from None
        _check_config(gen_config)
        cache = _check_cache(model, model_kwargs.pop("past_key_values", None))
        ids = _prompt(arguments.get("inputs"), model_kwargs)
        mask = model_kwargs.pop("attention_mask", None)
        model_kwargs = {k: v for k, v in model_kwargs.items() if v is not None and k != "use_cache"}
        if model_kwargs:
            raise _Fallback(f"model inputs GraphDecoder does not pass: {', '.join(sorted(model_kwargs))}")
        eos = _token_list(gen_config.eos_token_id, "eos_token_id")
        pad = _token_list(gen_config.pad_token_id, "pad_token_id")
        pad = pad[0] if pad else (eos[0] if eos else None)
        plan = _Plan(
            input_ids=ids,
            attention_mask=_mask(ids, mask, eos, pad),
            cache=cache,
            max_new_tokens=_new_tokens(model, gen_config, has_default_max_length, ids.shape[1]),
            eos_token_id=eos,
            pad_token_id=pad,
            sampling=_sampling(gen_config),
        )
        _check_device(model, plan, on_cpu, generator)
    except _Fallback as fallback:
        return False, str(fallback), None
    mode = "sampled" if plan.sampling else "greedy"
    return True, f"{mode}, {plan.max_new_tokens} new tokens, every option supported", plan


def decide_generate_path(model, *args, on_cpu: bool = False, generator=None, **kwargs) -> tuple[bool, str]:
    """Would ``model.generate(*args, **kwargs)`` take the GraphDecoder path? ``(use_graph, reason)``;
    the reason names the option that keeps it on the original path. Runs nothing on the model
    (it may read the inputs' values, e.g. to infer a mask from ``pad_token_id``)."""
    use_graph, reason, _ = _resolve(model, _original_generate(model), args, kwargs, on_cpu, generator)
    return use_graph, reason


def last_generate_path(model) -> GeneratePath | None:
    """The :class:`GeneratePath` of the last call of a patched ``model.generate`` (None before)."""
    return getattr(model, "_kvarn_last_generate_path", None)


def _patched_generate(model, original, on_cpu: bool, generator):
    @functools.wraps(original)
    def generate(*args, **kwargs):
        use_graph, reason, plan = _resolve(model, original, args, kwargs, on_cpu, generator)
        path = GeneratePath(use_graph, reason)
        model.__dict__["_kvarn_last_generate_path"] = path
        logger.debug("kvarn generate: %s (%s)", "graph" if use_graph else "original", reason)
        if not use_graph:
            return original(*args, **kwargs)
        decoder = cuda_graph.GraphDecoder(model, plan.cache)
        tokens = decoder.generate(
            plan.input_ids,
            plan.attention_mask,
            max_new_tokens=plan.max_new_tokens,
            eos_token_id=plan.eos_token_id,
            pad_token_id=plan.pad_token_id,
            **plan.sampling,
            **({"generator": generator} if plan.sampling else {}),
        )
        path.stats = decoder.stats
        return tokens

    generate.__kvarn_original__ = original
    return generate


def install_graph_generation(model, *, on_cpu: bool = False, generator: torch.Generator | None = None):
    """Patch ``model.generate`` (this instance only) to take the GraphDecoder path when it can;
    returns the model. Installing again replaces the patch (the original stays the original);
    :func:`remove_graph_generation` undoes it. ``on_cpu``: take the graph path on CPU too (the
    eager twin, for tests); ``generator``: the random numbers of sampled graph-path calls."""
    original = _original_generate(model)
    model.__dict__["generate"] = _patched_generate(model, original, on_cpu, generator)
    return model


def remove_graph_generation(model):
    """Undo :func:`install_graph_generation` (harmless when nothing is installed); returns the model."""
    current = model.__dict__.get("generate")
    if current is not None and hasattr(current, "__kvarn_original__"):
        del model.__dict__["generate"]
    return model


@contextlib.contextmanager
def graph_generation(
    model, *, on_cpu: bool = False, generator: torch.Generator | None = None
) -> Iterator[Any]:
    """``model.generate`` takes the GraphDecoder path inside the block when it can (see
    :func:`install_graph_generation` for the options); on exit, also after an exception,
    ``model.generate`` is again what it was on entry (nesting is harmless)."""
    before = model.__dict__.get("generate", _MISSING)
    install_graph_generation(model, on_cpu=on_cpu, generator=generator)
    try:
        yield model
    finally:
        if before is _MISSING:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = before
