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

import warnings
from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from kvarn.cache.errors import CacheUsageError, UnsupportedModelError
from kvarn.cache.layer import KVarNLayer
from kvarn.config import KVarNConfig

SLIDING_TYPES = ("sliding_attention", "chunked_attention")


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
