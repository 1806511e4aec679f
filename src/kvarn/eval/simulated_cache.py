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

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvarn.config import KVarNConfig
from kvarn.fake_quant import fake_quantize, fake_quantize_tiles, quantized_span

Timing = Literal["decode", "eager"]
TIMINGS: tuple[str, ...] = ("decode", "eager")


class SimulatedQuantizedLayer(DynamicLayer):
    """One layer: dense keys/values ``[batch, kv_heads, tokens, head_dim]`` with quantized tiles in place.

    ``config`` is one :class:`KVarNConfig` for every batch row, or a sequence of configs, one per
    row: then row ``b`` is quantized with ``config[b]`` (several methods decoded side by side in one
    batch; rows never interact in attention, so each row is exactly a single-method run).
    """

    # Cropping would need to un-quantize tiles; nothing in the evaluation needs it.
    is_croppable = False

    def __init__(self, config: KVarNConfig | Sequence[KVarNConfig], timing: Timing = "decode"):
        super().__init__()
        if timing not in TIMINGS:
            raise ValueError(f"timing={timing!r} is unknown; allowed: {list(TIMINGS)}")
        self.per_row = not isinstance(config, KVarNConfig)
        self.configs: tuple[KVarNConfig, ...] = tuple(config) if self.per_row else (config,)
        if not self.configs or not all(isinstance(c, KVarNConfig) for c in self.configs):
            raise TypeError("config must be a KVarNConfig or a non-empty sequence of KVarNConfig")
        self.timing = timing
        # Per config slot: tokens [0, final_upto) are final (the kept sink tile or quantized tiles).
        self.final_upto = [0] * len(self.configs)

    @property
    def config(self) -> KVarNConfig:
        if self.per_row:
            raise AttributeError("this layer has one config per batch row; use .configs")
        return self.configs[0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.per_row and key_states.shape[0] != len(self.configs):
            raise ValueError(
                f"{len(self.configs)} per-row configs but the batch has {key_states.shape[0]} rows"
            )
        super().lazy_initialization(key_states, value_states)

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
        """Replace every completed, not yet final tile by its reconstruction; returns tokens quantized (per row)."""
        if not self.is_initialized:
            return 0
        length = self.get_seq_length()
        keys = values = None  # cloned lazily: a tensor handed to an earlier attention call is never mutated
        quantized = 0
        for slot, config in enumerate(self.configs):
            g = config.tile_size
            complete = (length // g) * g
            if complete <= self.final_upto[slot]:
                continue
            start = self.final_upto[slot]
            if start == 0 and config.keep_sink_tile:
                start = g  # the sink tile stays in 16 bits
            if complete > start:
                rows = slice(slot, slot + 1) if self.per_row else slice(None)
                if keys is None:
                    keys, values = self.keys.clone(), self.values.clone()
                k_hat, v_hat = fake_quantize_tiles(
                    self.keys[rows, :, start:complete], self.values[rows, :, start:complete], config
                )
                keys[rows, :, start:complete] = k_hat
                values[rows, :, start:complete] = v_hat
                quantized = max(quantized, complete - start)
            self.final_upto[slot] = complete
        if keys is not None:
            self.keys, self.values = keys, values
        return quantized

    def load_prefilled(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take 16-bit prefilled keys/values and hold them as the cache would right after a prefill.

        Uses ``kvarn.fake_quant.fake_quantize`` (sink and partial tail kept, complete tiles quantized).
        """
        if self.is_initialized and self.get_seq_length() > 0:
            raise RuntimeError("load_prefilled needs an empty layer")
        self.lazy_initialization(keys, values)
        if self.per_row:
            parts = [fake_quantize(keys[b : b + 1], values[b : b + 1], c) for b, c in enumerate(self.configs)]
            self.keys = torch.cat([k for k, _ in parts], dim=0)
            self.values = torch.cat([v for _, v in parts], dim=0)
        else:
            self.keys, self.values = fake_quantize(keys, values, self.configs[0])
        self.final_upto = [(keys.shape[-2] // c.tile_size) * c.tile_size for c in self.configs]

    def load_unquantized(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold 16-bit keys/values as if they had just been appended by ``update`` (nothing final yet).

        With ``timing="decode"`` this is exactly the state after a prefill through ``update``: the
        prompt's complete tiles get quantized when the next token enters.
        """
        if self.is_initialized and self.get_seq_length() > 0:
            raise RuntimeError("load_unquantized needs an empty layer")
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        if self.timing == "eager":
            self.quantize_completed_tiles()

    def quantized_token_count(self) -> int:
        """How many tokens of this layer are currently held quantized (first config slot)."""
        start, end = quantized_span(self.final_upto[0], self.configs[0])
        return end - start


class SimulatedQuantizedCache(DynamicCache):
    """A ``DynamicCache`` of :class:`SimulatedQuantizedLayer` (layers created lazily, one per model layer).

    ``config``: one config for all batch rows, or one config per batch row.
    """

    def __init__(self, config: KVarNConfig | Sequence[KVarNConfig], timing: Timing = "decode"):
        if isinstance(config, KVarNConfig):
            configs: KVarNConfig | tuple[KVarNConfig, ...] = config
        else:
            configs = tuple(config)
            if not configs or not all(isinstance(c, KVarNConfig) for c in configs):
                raise TypeError("config must be a KVarNConfig or a non-empty sequence of KVarNConfig")
        self.config = configs
        self.timing = timing
        # Skip DynamicCache.__init__ (it builds plain DynamicLayers); Cache builds ours on demand.
        Cache.__init__(self, layer_class_to_replicate=lambda: SimulatedQuantizedLayer(configs, timing))

    @classmethod
    def from_prefill(
        cls,
        layers_kv: Iterable[tuple[torch.Tensor, torch.Tensor]],
        config: KVarNConfig | Sequence[KVarNConfig],
        timing: Timing = "decode",
        quantize: bool = True,
    ) -> SimulatedQuantizedCache:
        """A cache holding 16-bit prefilled ``(keys, values)`` per layer.

        ``quantize=True``: quantized at once with ``fake_quantize`` (prefill-then-quantize evaluation).
        ``quantize=False``: held as a prefill through ``update`` leaves them (quantized as decoding goes).
        """
        cache = cls(config, timing)
        for keys, values in layers_kv:
            layer = SimulatedQuantizedLayer(cache.config, timing)
            if quantize:
                layer.load_prefilled(keys, values)
            else:
                layer.load_unquantized(keys, values)
            cache.layers.append(layer)
        return cache

    def quantized_token_count(self) -> int:
        return sum(layer.quantized_token_count() for layer in self.layers)

    def __repr__(self) -> str:
        names = self.config.name if isinstance(self.config, KVarNConfig) else [c.name for c in self.config]
        return f"SimulatedQuantizedCache({names}, timing={self.timing!r}, layers={len(self.layers)})"


def exact_layers(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(keys, values)`` of every layer of a dense cache (e.g. a 16-bit ``DynamicCache``), cloned."""
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
