"""Growable storage of one layer's completed tiles: ``[B, Hkv, Ncap, ...]`` (docs/layerstore.md).

The capacity ``Ncap`` grows geometrically (by half, so at most a third of the tile storage is spare),
so appending tiles costs amortized O(1) per tile, never an O(n^2) concatenation. New slots are zero-filled: slots beyond a row's ``n_tiles``
are masked out by the attention, and zeros keep them finite (a masked weight of 0 times a NaN
left in uninitialized memory would still be NaN).
"""

from __future__ import annotations

import torch

from kvarn.codec import QuantizedKeys, QuantizedTiles, QuantizedValues
from kvarn.config import KVarNConfig
from kvarn.method.packing import packed_size

KEY_FIELDS = ("k_codes", "k_scale", "k_zero", "k_token_scale")
VALUE_FIELDS = ("v_codes", "v_scale", "v_zero", "v_channel_scale")
FIELDS = KEY_FIELDS + VALUE_FIELDS
CODE_FIELDS = ("k_codes", "v_codes")
MIN_CAPACITY = 4
GROWTH = 1.5


class TileStore:
    """Packed codes and folded metadata of completed tiles, for B rows and Hkv heads."""

    def __init__(self, batch: int, heads: int, head_dim: int, quant: KVarNConfig, device) -> None:
        g, d = quant.tile_size, head_dim
        md = quant.metadata_dtype
        self.quant = quant
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.device = torch.device(device)
        # trailing shape and dtype of each field, per (row, head, tile)
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "k_codes": ((d, packed_size(g, quant.key_bits)), torch.uint8),
            "k_scale": ((d,), md),
            "k_zero": ((d,), md),
            "k_token_scale": ((g,), md),
            "v_codes": ((g, packed_size(d, quant.value_bits)), torch.uint8),
            "v_scale": ((g,), md),
            "v_zero": ((g,), md),
            "v_channel_scale": ((d,), md),
        }
        self.capacity = 0
        for name in FIELDS:
            setattr(self, name, self._zeros(name, 0))

    def _zeros(self, name: str, capacity: int) -> torch.Tensor:
        trailing, dtype = self._layout[name]
        return torch.zeros((self.batch, self.heads, capacity, *trailing), dtype=dtype, device=self.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in FIELDS}

    def reserve(self, tiles: int, exact: bool = False) -> None:
        """Make room for ``tiles`` tiles per row: geometrically (amortized appends), or exactly
        that many when the caller knows the final length (``KVarNCache.reserve``)."""
        if tiles <= self.capacity:
            return
        new_capacity = tiles if exact else max(tiles, int(GROWTH * self.capacity) + 1, MIN_CAPACITY)
        for name in FIELDS:
            grown = self._zeros(name, new_capacity)
            grown[:, :, : self.capacity] = getattr(self, name)
            setattr(self, name, grown)
        self.capacity = new_capacity

    def write(self, rows: torch.Tensor, slots: torch.Tensor, tiles: QuantizedTiles) -> None:
        """Store ``tiles`` (leading dims ``[T, Hkv]``) at ``(rows[i], :, slots[i])``.

        The caller reserves the capacity first (it knows the slots on the host; reading them
        from ``slots`` here would synchronize a GPU).
        """
        if rows.numel() == 0:
            return
        parts = {
            "k_codes": tiles.keys.codes,
            "k_scale": tiles.keys.scale,
            "k_zero": tiles.keys.zero,
            "k_token_scale": tiles.keys.token_scale,
            "v_codes": tiles.values.codes,
            "v_scale": tiles.values.scale,
            "v_zero": tiles.values.zero,
            "v_channel_scale": tiles.values.channel_scale,
        }
        for name, value in parts.items():
            getattr(self, name)[rows, :, slots] = value

    def tile(self, row: int, slot: int) -> QuantizedTiles:
        """One stored tile of every head of ``row`` (leading dim ``[Hkv]``), as codec tiles."""
        return self.tiles(row, slot, slot + 1).map(lambda t: t[:, 0])

    def tiles(self, row: int, start: int, stop: int) -> QuantizedTiles:
        """Tiles ``start .. stop-1`` of ``row`` (leading dims ``[Hkv, stop - start]``)."""
        t = {name: getattr(self, name)[row, :, start:stop] for name in FIELDS}
        keys = QuantizedKeys(t["k_codes"], t["k_scale"], t["k_zero"], t["k_token_scale"], self.quant.key_bits)
        values = QuantizedValues(
            t["v_codes"], t["v_scale"], t["v_zero"], t["v_channel_scale"], self.quant.value_bits
        )
        return QuantizedTiles(keys, values)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat rows: row ``i`` becomes old row ``index[i]``."""
        index = index.to(self.device)
        for name in FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.batch = int(index.numel())

    def nbytes_per_tile(self) -> dict[str, int]:
        """Bytes of one tile of one head: ``{"codes": ..., "metadata": ...}``."""
        codes = metadata = 0
        for name, (trailing, dtype) in self._layout.items():
            n = torch.Size(trailing).numel() * torch.empty((), dtype=dtype).element_size()
            if name in CODE_FIELDS:
                codes += n
            else:
                metadata += n
        return {"codes": codes, "metadata": metadata}

    def allocated_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
