"""``KVarNCache``: a transformers 5.x ``Cache`` whose full-attention layers store KVarN tiles.

Usage (the attention implementation must be "kvarn", registered by ``import kvarn``)::

    import kvarn
    model.set_attn_implementation("kvarn")
    cache = kvarn.KVarNCache(config=model.config, quant="k4v2")
    out = model.generate(**inputs, past_key_values=cache)

Layer kinds, from the config's ``layer_types`` (as transformers' DynamicCache reads them):

* ``full_attention`` -> :class:`KVarNLayer` (sink + packed tiles + tail);
* ``sliding_attention`` / ``chunked_attention`` -> transformers' own ``DynamicSlidingWindowLayer``,
  kept in 16 bits: its memory is bounded by the window anyway, and the kvarn attention function
  falls back to transformers' sdpa for these layers. A config with a global ``sliding_window``
  (Mistral-style) therefore has no quantized layer at all (a warning says so).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from kvarn.cache.errors import CacheFileError, CacheStateError, CacheUsageError, UnsupportedModelError
from kvarn.cache.layer import DTYPE_NAMES, KVarNLayer
from kvarn.config import KVarNConfig

SLIDING_TYPES = ("sliding_attention", "chunked_attention")
# Saved caches (KVarNCache.state_dict, kvarn.save_cache): the header's "format" and the version of
# the layout below; a loader refuses other versions.
STATE_FORMAT = "kvarn-cache"
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CacheBytes:
    """Bytes held by a KVarNCache.

    ``codes``, ``metadata``, ``tail`` and ``sink`` count the valid slots of the KVarN layers (what the
    stored tokens really take); ``dense_layers`` the 16-bit sliding-window layers; ``total`` their
    sum; ``allocated`` every tensor as allocated (spare tile capacity, full sink/tail buffers).
    """

    codes: int
    metadata: int
    tail: int
    sink: int
    dense_layers: int
    allocated: int

    @property
    def total(self) -> int:
        return self.codes + self.metadata + self.tail + self.sink + self.dense_layers

    @property
    def quantized(self) -> int:
        """Bytes of the completed tiles (codes + metadata)."""
        return self.codes + self.metadata

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _text_config(config):
    if config is None or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError(
            f"KVarNCache(config=...) needs the model's transformers config (model.config), got {type(config).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(config).__name__} is an encoder-decoder model; KVarNCache supports decoder-only causal LMs"
        )
    return config.get_text_config(decoder=True)


class CacheState(NamedTuple):
    """A KVarNCache as one flat dict of tensors (``layers.{i}.{name}``) and a header of strings
    (``format``, ``format_version``, ``kvarn_version``, and JSON ``quant``, ``model`` and
    ``layers``): exactly what :func:`kvarn.save_cache` writes to a safetensors file."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def model_fingerprint(config) -> dict:
    """What a saved cache must agree on with the model that continues from it."""
    text_config = _text_config(config)
    kv_heads, head_dim = _head_dims(text_config)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    return {
        "model_type": str(getattr(text_config, "model_type", "")),
        "num_hidden_layers": len(layer_types),
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "layer_types": list(layer_types),
        "sliding_window": layer_kwargs.get("sliding_window"),
    }


def _check_fingerprint(saved: dict, expected: dict) -> None:
    names = (
        "num_hidden_layers",
        "layer_types",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
        "model_type",
    )
    for name in names:
        if name == "sliding_window" and not any(kind in SLIDING_TYPES for kind in expected["layer_types"]):
            continue
        if saved.get(name) != expected[name]:
            raise CacheFileError(
                f"the saved cache was made for another model: {name} is {saved.get(name)!r} in the file but "
                f"{expected[name]!r} in the config given (saved model: {saved})"
            )


def _sliding_state(layer: DynamicSlidingWindowLayer, idx: int) -> tuple[dict[str, torch.Tensor], dict]:
    if getattr(layer, "record_past", False):
        raise CacheStateError(
            f"cannot save sliding-window layer {idx}: past recording (assisted decoding) is on, so it may "
            "hold more than its window; save a cache filled by plain generate/forward"
        )
    meta = {
        "kind": "sliding",
        "sliding_window": int(layer.sliding_window),
        "initialized": int(layer.is_initialized),
    }
    if not layer.is_initialized:
        return {}, meta
    meta.update(
        cumulative_length=int(layer.cumulative_length), dtype=str(layer.keys.dtype).removeprefix("torch.")
    )
    return {"keys": layer.keys.contiguous(), "values": layer.values.contiguous()}, meta


def _sliding_from_state(
    tensors: dict[str, torch.Tensor], meta: dict, idx: int, device
) -> DynamicSlidingWindowLayer:
    try:
        layer = DynamicSlidingWindowLayer(sliding_window=int(meta["sliding_window"]))
        if not meta["initialized"]:
            return layer
        cumulative = int(meta["cumulative_length"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFileError(f"saved sliding-window layer {idx}: bad metadata {meta!r} ({exc!r})") from exc
    missing = [name for name in ("keys", "values") if name not in tensors]
    if missing:
        raise CacheFileError(f"saved sliding-window layer {idx}: missing tensors {missing}")
    dtype = DTYPE_NAMES.get(meta.get("dtype"), tensors["keys"].dtype)
    keys, values = (tensors[name].to(device=device, dtype=dtype) for name in ("keys", "values"))
    if keys.shape != values.shape or keys.ndim != 4:
        raise CacheFileError(
            f"saved sliding-window layer {idx}: keys {tuple(keys.shape)} / values {tuple(values.shape)}"
        )
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    layer.cumulative_length = cumulative
    return layer


def _head_dims(text_config) -> tuple[int, int]:
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = getattr(text_config, "hidden_size", 0) // heads
    if not heads or not kv_heads or not head_dim or not getattr(text_config, "num_hidden_layers", None):
        raise UnsupportedModelError(
            f"{type(text_config).__name__} lacks num_hidden_layers / num_attention_heads / head_dim: "
            "not a standard decoder-only attention model"
        )
    if head_dim % 8:
        raise UnsupportedModelError(f"head_dim={head_dim} is not a multiple of 8, which KVarN packing needs")
    return int(kv_heads), int(head_dim)


class KVarNCache(Cache):
    """KV cache storing completed tiles as packed KVarN codes (see module docstring).

    Args:
        config: the model's config (``model.config``); the cache reads the layer layout from it and
            checks, at every update, that its attention implementation is "kvarn".
        quant: a :class:`~kvarn.config.KVarNConfig` or a spec string: a preset (``"k4v2"``,
            ``"k4v4"``, ``"k3v2"``, ``"k2v2"``, ``"k8v8"``) or ``"method:preset"`` (``"kivi:k2v2"``).
            Only tile methods (kvarn, kivi, hadamard_rtn, varn_norot) can be stored.
        **overrides: ``KVarNConfig`` fields, e.g. ``tile_size=64``, ``keep_sink_tile=False``.
    """

    def __init__(self, config, quant: KVarNConfig | str = "k4v2", **overrides) -> None:
        text_config = _text_config(config)
        self.quant = KVarNConfig.parse(quant, **overrides)
        if self.quant.family != "tile":
            raise ValueError(
                f"KVarNCache stores tile methods (kvarn, kivi, hadamard_rtn, varn_norot); {self.quant.name!r} "
                "is not one. Use kvarn.fake_quantize (or the evaluation's simulated cache) for the other "
                "baselines."
            )
        kv_heads, head_dim = _head_dims(text_config)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        layers = []
        for idx, kind in enumerate(layer_types):
            if kind == "full_attention":
                layers.append(KVarNLayer(self.quant, idx, kv_heads, head_dim, model_config=text_config))
            elif kind in SLIDING_TYPES:
                layers.append(DynamicSlidingWindowLayer(sliding_window=layer_kwargs["sliding_window"]))
            else:
                raise UnsupportedModelError(
                    f"layer {idx} has type {kind!r}; KVarNCache supports full_attention and "
                    "sliding/chunked attention layers only"
                )
        if not any(isinstance(layer, KVarNLayer) for layer in layers):
            warnings.warn(
                "every layer of this model is a sliding-window layer; KVarNCache keeps those in 16 bits, so "
                "nothing will be quantized (set config.sliding_window=None to quantize every layer)",
                stacklevel=2,
            )
        self.model_config = text_config
        super().__init__(layers=layers)

    # ---- transformers entry point ---------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool):
            raise UnsupportedModelError(
                f"the model called cache.update with layer_idx={layer_idx!r}; KVarNCache needs attention modules "
                "that know their layer index"
            )
        if not 0 <= layer_idx < len(self.layers):
            raise CacheUsageError(
                f"layer_idx={layer_idx} is outside this cache's {len(self.layers)} layers: the cache was built "
                "for another model config; build KVarNCache(config=model.config)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reserve(self, tokens: int) -> None:
        """Preallocate every KVarN layer's tile storage for rows of up to ``tokens`` tokens.

        E.g. ``cache.reserve(prompt_len + max_new_tokens)`` before ``generate``: the packed tiles
        then take exactly what they need instead of growing by half when full (at most a third
        spare); callable before the first update (applied when the layer sees its batch) or
        after (grows now).
        """
        for layer in self.kvarn_layers:
            layer.reserve(tokens)

    # ---- saving and loading --------------------------------------------------------------------------
    def state_dict(self) -> CacheState:
        """The cache as tensors + string header (see :class:`CacheState`), for ``kvarn.save_cache``.

        Raises CacheStateError for an empty cache or one not at rest (a forward call in progress,
        CUDA-graph decoding, past recording of assisted decoding, tiles waiting to be quantized).
        The tensors stay where they are (no copy to the host).
        """
        if not any(layer.is_initialized for layer in self.layers):
            raise CacheStateError("the cache is empty: nothing to save (run a prefill first)")
        from kvarn import __version__  # local import: kvarn imports this module

        tensors: dict[str, torch.Tensor] = {}
        layers_meta = []
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, KVarNLayer):
                layer_tensors, meta = layer.state()
            elif isinstance(layer, DynamicSlidingWindowLayer):
                layer_tensors, meta = _sliding_state(layer, idx)
            else:
                raise CacheStateError(
                    f"cannot save layer {idx}: {type(layer).__name__} is not a KVarNCache layer"
                )
            tensors.update({f"layers.{idx}.{name}": t.contiguous() for name, t in layer_tensors.items()})
            layers_meta.append(meta)
        fingerprint = (
            model_fingerprint(self.model_config) if self.model_config is not None else self._fingerprint
        )
        metadata = {
            "format": STATE_FORMAT,
            "format_version": str(STATE_FORMAT_VERSION),
            "kvarn_version": __version__,
            "quant": json.dumps(self.quant.to_dict(), sort_keys=True),
            "model": json.dumps(fingerprint, sort_keys=True),
            "layers": json.dumps(layers_meta),
        }
        return CacheState(tensors, metadata)

    @classmethod
    def from_state_dict(
        cls,
        config,
        state: CacheState | tuple[dict[str, torch.Tensor], dict[str, str]],
        device: torch.device | str | None = None,
        quant: KVarNConfig | str | None = None,
    ) -> KVarNCache:
        """Rebuild the cache :meth:`state_dict` described, on ``device`` (default: the tensors').

        ``config`` is the model config the cache will be used with: the saved layer count, layer
        types, KV heads, head dim, sliding window and model type must match it (CacheFileError
        naming the first difference otherwise). ``config=None`` skips the check and rebuilds the
        layers from the state alone (the attention-implementation check is then off). ``quant``,
        if given, must equal the saved quantizer. The loaded cache continues with ``update``
        (decoding, further prefill) and accepts ``reserve``; reserved capacity is not restored.
        """
        tensors, metadata = state
        header = _parse_header(metadata)
        saved_quant = KVarNConfig.from_dict(header["quant"])
        if quant is not None:
            wanted = KVarNConfig.parse(quant)
            if wanted != saved_quant:
                raise CacheFileError(f"the saved cache holds {saved_quant!r}, not the requested {wanted!r}")
        layers_meta = header["layers"]
        if len(layers_meta) != header["model"].get("num_hidden_layers"):
            raise CacheFileError(
                f"the header lists {len(layers_meta)} layers but its model has {header['model'].get('num_hidden_layers')}"
            )
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in layers_meta]
        for name, tensor in tensors.items():
            prefix, _, rest = name.partition(".")
            idx, _, field = rest.partition(".")
            if prefix != "layers" or not idx.isdigit() or int(idx) >= len(per_layer) or not field:
                raise CacheFileError(
                    f"unexpected tensor {name!r} in a saved cache of {len(per_layer)} layers"
                )
            per_layer[int(idx)][field] = tensor
        if config is not None:
            _check_fingerprint(header["model"], model_fingerprint(config))
            cache = cls(config, quant=saved_quant)
            model_config = cache.model_config
        else:
            cache = cls.__new__(cls)
            cache.quant, cache.model_config, model_config = saved_quant, None, None
            Cache.__init__(cache, layers=[None] * len(layers_meta))
        cache._fingerprint = header["model"]
        layer_types = header["model"].get("layer_types") or []
        for idx, (meta, layer_tensors) in enumerate(zip(layers_meta, per_layer, strict=True)):
            kind = meta.get("kind")
            expected = (
                "kvarn" if idx < len(layer_types) and layer_types[idx] == "full_attention" else "sliding"
            )
            if kind != expected:
                raise CacheFileError(
                    f"saved layer {idx} is a {kind!r} layer, its model's layer type a {expected!r} one"
                )
            if kind == "kvarn":
                if meta.get("layer_idx") != idx:
                    raise CacheFileError(f"saved layer {idx} says it is layer {meta.get('layer_idx')}")
                cache.layers[idx] = KVarNLayer.from_state(layer_tensors, meta, model_config, device)
                if cache.layers[idx].quant != saved_quant:
                    raise CacheFileError(
                        f"saved layer {idx} holds {cache.layers[idx].quant!r}, the cache {saved_quant!r}"
                    )
            else:
                cache.layers[idx] = _sliding_from_state(layer_tensors, meta, idx, device)
        return cache

    # ---- inspection ---------------------------------------------------------------------------------
    @property
    def kvarn_layers(self) -> list[KVarNLayer]:
        return [layer for layer in self.layers if isinstance(layer, KVarNLayer)]

    def _kvarn_layer(self, layer_idx: int) -> KVarNLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, KVarNLayer):
            raise ValueError(f"layer {layer_idx} is a 16-bit {type(layer).__name__}, not a KVarN layer")
        return layer

    def materialize(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(keys, values) [B, Hkv, S, D]`` of a KVarN layer, in the original frame.

        For debugging and other attention backends only; rows are left-padded with zeros to the
        longest (see :meth:`stored_lengths`). Sliding-window layers are returned as stored.
        """
        layer = self.layers[layer_idx]
        if isinstance(layer, KVarNLayer):
            return layer.materialize()
        return layer.keys, layer.values

    def stored_lengths(self, layer_idx: int) -> list[int]:
        """Real tokens held per row by a KVarN layer (padding is never stored)."""
        return self._kvarn_layer(layer_idx).stored_lengths()

    def nbytes(self) -> CacheBytes:
        totals = {"codes": 0, "metadata": 0, "tail": 0, "sink": 0, "allocated": 0}
        dense = 0
        for layer in self.layers:
            if isinstance(layer, KVarNLayer):
                for key, value in layer.nbytes().items():
                    totals[key] += value
            elif layer.is_initialized and layer.keys is not None:
                n = (
                    layer.keys.numel() * layer.keys.element_size()
                    + layer.values.numel() * layer.values.element_size()
                )
                dense += n
                totals["allocated"] += n
        return CacheBytes(dense_layers=dense, **totals)

    def dynamic_cache_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes a transformers DynamicCache would hold for the same positions.

        DynamicCache stores every position (padding included) of every row in the model dtype,
        or in ``dtype`` if given (e.g. ``torch.float16`` for the 16-bit reference of a float32
        model). Sliding-window layers hold the same in both caches.
        """
        total = 0
        for layer in self.layers:
            if isinstance(layer, KVarNLayer):
                if not layer.is_initialized:
                    continue
                size = torch.empty((), dtype=dtype or layer.dtype).element_size()
                total += 2 * layer.batch * layer.num_kv_heads * layer.columns * layer.head_dim * size
            elif layer.is_initialized and layer.keys is not None:
                size = torch.empty((), dtype=dtype or layer.keys.dtype).element_size()
                total += 2 * layer.keys.numel() * size
        return total

    def __repr__(self) -> str:
        return f"KVarNCache(quant={self.quant.name}, layers={len(self.layers)}, seq_length={self.get_seq_length()})"


def _parse_header(metadata: dict[str, str] | None) -> dict:
    """The saved header with its JSON fields decoded; CacheFileError if it is not a kvarn cache's."""
    if not metadata or metadata.get("format") != STATE_FORMAT:
        raise CacheFileError(
            "not a kvarn cache: the safetensors header has no format='kvarn-cache' entry "
            "(files written by kvarn.save_cache have one)"
        )
    version = metadata.get("format_version")
    if version != str(STATE_FORMAT_VERSION):
        raise CacheFileError(
            f"kvarn cache format version {version!r} is not supported by this kvarn (reads version "
            f"{STATE_FORMAT_VERSION}; the file was written by kvarn {metadata.get('kvarn_version')!r})"
        )
    try:
        header = {name: json.loads(metadata[name]) for name in ("quant", "model", "layers")}
    except (KeyError, ValueError) as exc:
        raise CacheFileError(f"damaged kvarn cache header: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header["layers"], list) or not isinstance(header["model"], dict):
        raise CacheFileError("damaged kvarn cache header: 'layers' must be a list and 'model' an object")
    return header
