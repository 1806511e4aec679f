"""An evaluation cache that shows the model exactly what a quantized KV cache would hold.

``SimulatedQuantizedCache`` is a transformers ``DynamicCache`` whose layers keep dense tensors, but
where every completed tile (except the sink tile, when kept) is replaced ONCE by its
quantize-dequantize reconstruction (``kvarn.fake_quant.fake_quantize_tiles``). The model's own
attention (sdpa) then reads, tile by tile as in generation, what a compact cache would give back.
It works for every method of ``kvarn.config.METHODS``, including those the compact
``KVarNCache`` does not store (``per_token_rtn``, ``fp8_e4m3``, ``none``).

When is a tile quantized? ``timing="decode"`` (the default) quantizes the tiles completed by earlier
updates at the start of the next ``update``: the queries of the forward pass that fills a tile read
that tile in 16 bits (it is their own partial tile, as during token-by-token decoding), and every
later query reads it quantized. With teacher forcing in tile-sized chunks this reproduces decoding
exactly, except that during real decoding the one query that completes a tile might already see it
quantized. ``timing="eager"`` quantizes completed tiles right after appending, before attention.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvarn.config import KVarNConfig
from kvarn.fake_quant import fake_quantize, fake_quantize_tiles, quantized_span

Timing = Literal["decode", "eager"]
TIMINGS: tuple[str, ...] = ("decode", "eager")


class SimulatedQuantizedLayer(DynamicLayer):
    """One layer: dense keys/values ``[batch, kv_heads, tokens, head_dim]`` with quantized tiles in place."""

    # Cropping would need to un-quantize tiles; nothing in the evaluation needs it.
    is_croppable = False

    def __init__(self, config: KVarNConfig, timing: Timing = "decode"):
        super().__init__()
        if timing not in TIMINGS:
            raise ValueError(f"timing={timing!r} is unknown; allowed: {list(TIMINGS)}")
        self.config = config
        self.timing = timing
        # Tokens [0, final_upto) are final: the kept sink tile or quantized tiles. Never touched again.
        self.final_upto = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.timing == "decode":
            self.quantize_completed_tiles()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.timing == "eager":
            self.quantize_completed_tiles()
        return self.keys, self.values

    def quantize_completed_tiles(self) -> int:
        """Replace every completed, not yet final tile by its reconstruction; returns tokens quantized."""
        if not self.is_initialized:
            return 0
        g = self.config.tile_size
        complete = (self.get_seq_length() // g) * g
        if complete <= self.final_upto:
            return 0
        start = self.final_upto
        if start == 0 and self.config.keep_sink_tile:
            start = g  # the sink tile stays in 16 bits
        quantized = 0
        if complete > start:
            k_hat, v_hat = fake_quantize_tiles(
                self.keys[:, :, start:complete], self.values[:, :, start:complete], self.config
            )
            # Fresh tensors: a tensor handed to an earlier attention call is never mutated.
            self.keys = torch.cat([self.keys[:, :, :start], k_hat, self.keys[:, :, complete:]], dim=-2)
            self.values = torch.cat([self.values[:, :, :start], v_hat, self.values[:, :, complete:]], dim=-2)
            quantized = complete - start
        self.final_upto = complete
        return quantized

    def load_prefilled(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take 16-bit prefilled keys/values and hold them as the cache would after a prefill.

        Uses ``kvarn.fake_quant.fake_quantize`` (sink and partial tail kept, complete tiles quantized).
        """
        if self.is_initialized and self.get_seq_length() > 0:
            raise RuntimeError("load_prefilled needs an empty layer")
        self.lazy_initialization(keys, values)
        self.keys, self.values = fake_quantize(keys, values, self.config)
        g = self.config.tile_size
        self.final_upto = (keys.shape[-2] // g) * g

    def quantized_token_count(self) -> int:
        """How many tokens of this layer are currently held quantized."""
        start, end = quantized_span(self.final_upto, self.config)
        return end - start


class SimulatedQuantizedCache(DynamicCache):
    """A ``DynamicCache`` of :class:`SimulatedQuantizedLayer` (layers created lazily, one per model layer)."""

    def __init__(self, config: KVarNConfig, timing: Timing = "decode"):
        if not isinstance(config, KVarNConfig):
            raise TypeError(f"config must be a KVarNConfig, got {type(config).__name__}")
        self.config = config
        self.timing = timing
        # Skip DynamicCache.__init__ (it builds plain DynamicLayers); Cache builds ours on demand.
        Cache.__init__(self, layer_class_to_replicate=lambda: SimulatedQuantizedLayer(config, timing))

    @classmethod
    def from_prefill(
        cls,
        layers_kv: Iterable[tuple[torch.Tensor, torch.Tensor]],
        config: KVarNConfig,
        timing: Timing = "decode",
    ) -> SimulatedQuantizedCache:
        """A cache holding 16-bit prefilled ``(keys, values)`` per layer, quantized with ``fake_quantize``."""
        cache = cls(config, timing)
        for keys, values in layers_kv:
            layer = SimulatedQuantizedLayer(config, timing)
            layer.load_prefilled(keys, values)
            cache.layers.append(layer)
        return cache

    def quantized_token_count(self) -> int:
        return sum(layer.quantized_token_count() for layer in self.layers)

    def __repr__(self) -> str:
        return (
            f"SimulatedQuantizedCache({self.config.name}, timing={self.timing!r}, layers={len(self.layers)})"
        )


def exact_layers(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(keys, values)`` of every layer of a dense cache (e.g. a 16-bit ``DynamicCache``), cloned."""
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
