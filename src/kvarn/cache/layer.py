"""One full-attention layer of a KVarNCache: sink + packed tiles + tail (docs/layerstore.md).

Life of a forward call (transformers calls ``update`` before the attention function):

1. ``update(k, v)`` checks the inputs, stashes them as *pending* and returns them unchanged; it
   publishes them through ``kvarn.cache.handoff`` so the "kvarn" attention function can find
   this layer.
2. ``attend(module, query, new_valid, scaling)`` (called by the attention function, which knows
   the padding) computes the new tokens' attention over the cache *as it stood before the call*
   (sink and tail in the model dtype, completed tiles as packed codes) plus the new tokens at full
   precision (causal among themselves, padding masked); then
3. ``commit`` stores the new tokens: rotated once (iff the method rotates), padding dropped per
   row, tiles that complete quantized in one batched ``encode_tiles`` call. A token is quantized
   exactly once, when its tile completes, and never again (except after a ``crop`` into a tile,
   see there).

Each row is aligned to its own first real token (left padding is never stored), so rows of a
padded batch are stored exactly as they would be alone; rows may hold different counts.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from kvarn.attention.decode import quantized_decode_attention
from kvarn.attention.reference import quantized_attention_reference
from kvarn.attention.triton.dispatch import maybe_triton_compress
from kvarn.cache import handoff
from kvarn.cache.errors import NOT_KVARN_ATTENTION, CacheUsageError, UnsupportedModelError
from kvarn.cache.storage import TileStore
from kvarn.codec import decode_tiles, encode_tiles
from kvarn.config import KVarNConfig
from kvarn.method.hadamard import hadamard_matrix, hadamard_transform

# Calls with at most this many new tokens (all real) go through the decode seam (where a fused
# kernel can take over); longer ones (prefill) use the chunked reference with query blocks.
DECODE_MAX_QUERIES = 16
ROTATE_CHUNK = 2048  # tokens rotated per float64 product when a long prefill enters the cache
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@functools.lru_cache(maxsize=32)
def _rotation(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(dim, dtype=dtype, device=device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class KVarNLayer(CacheLayerMixin):
    """KV storage of one full-attention layer in KVarN form."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(
        self,
        quant: KVarNConfig,
        layer_idx: int,
        num_kv_heads: int,
        head_dim: int,
        model_config=None,
    ) -> None:
        super().__init__()
        self.quant = quant
        self.layer_idx = layer_idx
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.tile_size = quant.tile_size
        # The model config whose `_attn_implementation` must be "kvarn" (transformers keeps it up
        # to date when set_attn_implementation is called).
        self._model_config = model_config
        self._clear()

    # ---- state ---------------------------------------------------------------------------------
    def _clear(self) -> None:
        self.is_initialized = False
        self.dtype = None
        self.device = None
        self.batch = 0
        self.store: TileStore | None = None
        self.sink_k = self.sink_v = self.tail_k = self.tail_v = None
        self._n_tiles: list[int] = []  # host mirrors of the [B] counters (no device syncs)
        self._sink_len: list[int] = []
        self._tail_len: list[int] = []
        self._trailing_real: list[int] = []  # real tokens at the end of each row (for crop)
        self.columns = 0  # positions consumed, padding included (what transformers counts)
        self.n_tiles = self.sink_len = self.tail_len = None
        self._synced: dict[str, list[int]] = {}
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._owner: weakref.ref | None = None
        self.record_past = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch = key_states.shape[0]
        b, h, g, d = self.batch, self.num_kv_heads, self.tile_size, self.head_dim
        self.store = TileStore(b, h, d, self.quant, self.device)
        self.sink_k, self.sink_v, self.tail_k, self.tail_v = (
            torch.zeros((b, h, g, d), dtype=self.dtype, device=self.device) for _ in range(4)
        )
        self._n_tiles, self._sink_len, self._tail_len = [0] * b, [0] * b, [0] * b
        self._trailing_real = [0] * b
        self._sync_counters()
        self.is_initialized = True

    def _sync_counters(self) -> None:
        """Refresh the ``[B]`` int32 device counters from the host lists (only those that changed)."""
        for name in ("n_tiles", "sink_len", "tail_len"):
            host = getattr(self, "_" + name)
            if self._synced.get(name) != host:
                setattr(self, name, torch.tensor(host, dtype=torch.int32, device=self.device))
                self._synced[name] = list(host)

    def stored_lengths(self) -> list[int]:
        """Real tokens stored per row (sink + tiles + tail)."""
        g = self.tile_size
        return [s + n * g + t for s, n, t in zip(self._sink_len, self._n_tiles, self._tail_len, strict=True)]

    # ---- transformers Cache layer API ----------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stash this call's K/V; the "kvarn" attention function attends and commits them."""
        impl = getattr(self._model_config, "_attn_implementation", "kvarn")
        if impl != "kvarn":
            raise CacheUsageError(NOT_KVARN_ATTENTION.format(found=impl))
        if self.pending is not None:
            self.pending = None
            raise CacheUsageError(
                f"layer {self.layer_idx}: the tokens of the previous forward call were never attended "
                "and stored, so the attention function that ran was not kvarn's. "
                + NOT_KVARN_ATTENTION.format(found=impl)
            )
        self._check_new_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._settle_tail()
        self.pending = (key_states, value_states)
        handoff.publish(key_states, self)
        return key_states, value_states

    def _check_new_states(self, k: torch.Tensor, v: torch.Tensor) -> None:
        where = f"KVarNCache layer {self.layer_idx}"
        for name, x in (("key_states", k), ("value_states", v)):
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise UnsupportedModelError(
                    f"{where}: {name} must be a [batch, kv_heads, tokens, head_dim] tensor, got "
                    f"{getattr(x, 'shape', type(x).__name__)}"
                )
        if k.shape != v.shape:
            raise UnsupportedModelError(
                f"{where}: keys {tuple(k.shape)} and values {tuple(v.shape)} differ in shape "
                "(models with a different value head size are not supported)"
            )
        if k.shape[1] != self.num_kv_heads or k.shape[3] != self.head_dim:
            raise CacheUsageError(
                f"{where}: got {k.shape[1]} KV heads of dim {k.shape[3]}, but the cache was built for "
                f"{self.num_kv_heads} heads of dim {self.head_dim}: it belongs to another model config; "
                "build a new KVarNCache(config=model.config)"
            )
        if k.dtype not in SUPPORTED_DTYPES:
            raise CacheUsageError(f"{where}: dtype {k.dtype} is not supported (float32, float16, bfloat16)")
        if self.is_initialized:
            if k.dtype != self.dtype:
                raise CacheUsageError(
                    f"{where}: the model dtype changed mid-generation ({self.dtype} -> {k.dtype}); "
                    "call cache.reset() or build a new cache"
                )
            if k.shape[0] != self.batch:
                raise CacheUsageError(
                    f"{where}: batch size changed mid-generation ({self.batch} -> {k.shape[0]}); use "
                    "batch_select_indices / batch_repeat_interleave / reorder_cache, or call cache.reset()"
                )
            if k.device != self.device:
                raise CacheUsageError(
                    f"{where}: tensors moved from {self.device} to {k.device} mid-generation"
                )

    def get_seq_length(self) -> int:
        return self.columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        raise NotImplementedError("KVarNCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("KVarNCache does not support offloading")

    def reset(self) -> None:
        """Forget every token (and the batch size, dtype and owning model)."""
        self._clear()

    # ---- attention + commit --------------------------------------------------------------------
    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Hadamard rotation (self-inverse) of queries/outputs in float32 (float64 stays)."""
        if not self.quant.rotate:
            return x
        cdt = _compute_dtype(x.dtype)
        return (x.to(cdt) @ _rotation(self.head_dim, cdt, x.device)).to(x.dtype)

    def _rotate_for_storage(self, x: torch.Tensor) -> torch.Tensor:
        """Hadamard rotation of tokens entering the cache, computed in float64.

        A float32 matmul rounds differently depending on the shape of the call (BLAS blocking),
        so a token rotated in a 1-token decode step and in a 100-token prefill (or in a padded
        batch and alone) could differ in the last bit and quantize differently. Rounding the
        float64 product to the model dtype makes the stored token independent of the call shape.
        """
        if not self.quant.rotate:
            return x
        rot = _rotation(self.head_dim, torch.float64, x.device)
        if x.shape[2] <= ROTATE_CHUNK:
            return (x.double() @ rot).to(x.dtype)
        out = torch.empty_like(x)  # long prefill: bound the float64 temporaries
        for t0 in range(0, x.shape[2], ROTATE_CHUNK):
            out[:, :, t0 : t0 + ROTATE_CHUNK] = (x[:, :, t0 : t0 + ROTATE_CHUNK].double() @ rot).to(x.dtype)
        return out

    def _check_owner(self, module) -> None:
        if self._owner is not None and self.columns > 0:
            owner = self._owner()
            if owner is not module:
                raise CacheUsageError(
                    f"KVarNCache layer {self.layer_idx} holds tokens of another model (or another attention "
                    "module); a cache belongs to one model and one generation: call cache.reset() or build a "
                    "new cache"
                )
        self._owner = weakref.ref(module)

    def attend(
        self,
        module,
        query: torch.Tensor,
        new_valid: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention output ``[B, L, Hq, D]`` of this call's queries; then stores the new tokens.

        ``new_valid [B, L]`` marks real (True) and padding (False) tokens; None means all real.
        """
        if self.pending is None:
            raise CacheUsageError(
                f"KVarNCache layer {self.layer_idx}: attention was called without a preceding update"
            )
        keys, values = self.pending
        self.pending = None
        self._check_owner(module)
        batch, hq, length, dim = query.shape
        if batch != self.batch or dim != self.head_dim or length != keys.shape[2]:
            raise UnsupportedModelError(
                f"KVarNCache layer {self.layer_idx}: query {tuple(query.shape)} does not match the new keys "
                f"{tuple(keys.shape)}"
            )
        if hq % self.num_kv_heads:
            raise UnsupportedModelError(
                f"{hq} query heads are not a multiple of {self.num_kv_heads} KV heads"
            )
        if new_valid is not None and bool(new_valid.all()):
            new_valid = None
        history_empty = self.columns == 0

        if history_empty and new_valid is None:
            # Nothing stored yet and no padding: this is exactly the 16-bit prefill.
            out = F.scaled_dot_product_attention(
                query,
                keys,
                values,
                is_causal=length > 1,
                scale=scaling,
                enable_gqa=hq != self.num_kv_heads,
            )
            k_rot, v_rot = self._rotate_for_storage(keys), self._rotate_for_storage(values)
        else:
            q_rot = self._rotate(query)
            k_rot, v_rot = self._rotate_for_storage(keys), self._rotate_for_storage(values)
            store = self.store.tensors()
            args = (
                q_rot,
                store["k_codes"],
                store["k_scale"],
                store["k_zero"],
                store["k_token_scale"],
                store["v_codes"],
                store["v_scale"],
                store["v_zero"],
                store["v_channel_scale"],
                self.n_tiles,
                self.sink_k,
                self.sink_v,
                self.sink_len,
                self.tail_k,
                self.tail_v,
                self.tail_len,
                k_rot,
                v_rot,
                self.quant.key_bits,
                self.quant.value_bits,
                scaling,
            )
            bounds = {"max_tiles": max(self._n_tiles), "min_tiles": min(self._n_tiles)}
            if new_valid is None and length <= DECODE_MAX_QUERIES:
                out_rot = quantized_decode_attention(*args, **bounds)
            else:
                out_rot = quantized_attention_reference(*args, new_valid=new_valid, **bounds)
            out = self._rotate(out_rot)
        self.commit(k_rot, v_rot, new_valid)
        return out.transpose(1, 2)

    def commit(self, k: torch.Tensor, v: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        """Append the real tokens of ``k, v [B, Hkv, L, D]`` (cache frame) to each row.

        Tokens go to the sink while it has room, then to the tail; tiles the tail completes are
        quantized right away (all rows and heads in one ``encode_tiles`` call), or, while
        ``record_past`` is on, at the start of the next update (see :meth:`activate_past_recording`).
        """
        b, h, length, d = k.shape
        g = self.tile_size
        dev = k.device
        if new_valid is None and self._append_fast(k, v):
            return
        if new_valid is None:
            counts = [length] * b
            rank = torch.arange(length, device=dev).expand(b, length)
            valid = torch.ones((b, length), dtype=torch.bool, device=dev)
        else:
            valid = new_valid.to(device=dev, dtype=torch.bool)
            counts = valid.sum(dim=1).tolist()
            rank = valid.long().cumsum(dim=1) - 1
        room = [g - s if self.quant.keep_sink_tile else 0 for s in self._sink_len]
        to_sink = [min(r, c) for r, c in zip(room, counts, strict=True)]
        fill = [t + c - s for t, c, s in zip(self._tail_len, counts, to_sink, strict=True)]

        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H, D]: token-major for scattering
        take = torch.tensor(to_sink, device=dev)[:, None]
        if any(to_sink):
            rows, cols = (valid & (rank < take)).nonzero(as_tuple=True)
            dest = self.sink_len.to(torch.long)[rows] + rank[rows, cols]
            self.sink_k[rows, :, dest] = kt[rows, cols]
            self.sink_v[rows, :, dest] = vt[rows, cols]

        self._reserve_tail((max(fill) // g + 1) * g)
        if new_valid is None and not any(to_sink) and len(set(self._tail_len)) == 1:
            t0 = self._tail_len[0]  # common decode case: every row appends at the same offset
            self.tail_k[:, :, t0 : t0 + length] = k
            self.tail_v[:, :, t0 : t0 + length] = v
        else:
            stream = valid & (rank >= take)
            if bool(stream.any()):
                dest = self.tail_len.to(torch.long)[:, None] + rank - take
                rows, cols = stream.nonzero(as_tuple=True)
                self.tail_k[rows, :, dest[rows, cols]] = kt[rows, cols]
                self.tail_v[rows, :, dest[rows, cols]] = vt[rows, cols]

        self._sink_len = [s + t for s, t in zip(self._sink_len, to_sink, strict=True)]
        self._tail_len = fill
        if new_valid is None:
            self._trailing_real = [t + length for t in self._trailing_real]
        else:
            last_pad = torch.where(~valid, torch.arange(length, device=dev), -1).amax(dim=1).tolist()
            self._trailing_real = [
                t + length if lp < 0 else length - 1 - lp
                for t, lp in zip(self._trailing_real, last_pad, strict=True)
            ]
        self.columns += length
        if not self.record_past:
            self._complete_tiles()
        self._sync_counters()

    def _append_fast(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Decode-step path: no padding, sinks full (or off), every row's tail at the same offset
        and not completing a tile. Returns False (nothing done) when it does not apply."""
        length, g = k.shape[2], self.tile_size
        t0 = self._tail_len[0]
        if t0 + length >= g or self._tail_len.count(t0) != self.batch or self.tail_k.shape[2] != g:
            return False
        if self.quant.keep_sink_tile and min(self._sink_len) < g:
            return False
        self.tail_k[:, :, t0 : t0 + length] = k
        self.tail_v[:, :, t0 : t0 + length] = v
        self._tail_len = [t0 + length] * self.batch
        self._trailing_real = [t + length for t in self._trailing_real]
        self.columns += length
        self._sync_counters()
        return True

    def _reserve_tail(self, tokens: int) -> None:
        """Grow the tail buffers (zero-filled, a multiple of G) to hold ``tokens`` per row."""
        capacity = self.tail_k.shape[2]
        if tokens <= capacity:
            return
        g = self.tile_size
        new_capacity = -(-max(tokens, 2 * capacity) // g) * g
        for name in ("tail_k", "tail_v"):
            old = getattr(self, name)
            grown = old.new_zeros((old.shape[0], old.shape[1], new_capacity, old.shape[3]))
            grown[:, :, :capacity] = old
            setattr(self, name, grown)

    def _complete_tiles(self) -> None:
        """Quantize every complete tile held in the tails (one ``encode_tiles`` call for all rows,
        heads and tiles) and keep the remainder (< G tokens) as the new, G-sized tail."""
        g = self.tile_size
        done = [t // g for t in self._tail_len]
        if max(done) == 0:
            return
        b = self.batch
        dev = self.tail_k.device
        self._reserve_tail((max(self._tail_len) // g + 1) * g)  # room for each row's next G slots
        capacity = self.tail_k.shape[2]
        done_t = torch.tensor(done, device=dev)
        tile_rows = torch.repeat_interleave(torch.arange(b, device=dev), done_t)
        tile_idx = torch.cat([torch.arange(n, device=dev) for n in done])
        shape = (b, self.num_kv_heads, capacity // g, g, self.head_dim)
        k_tiles = self.tail_k.view(shape)[tile_rows, :, tile_idx]  # [T, H, G, D]
        v_tiles = self.tail_v.view(shape)[tile_rows, :, tile_idx]
        # CUDA: the fused compression kernel (same codes as encode_tiles except at exact rounding ties)
        encoded = maybe_triton_compress(k_tiles, v_tiles, self.quant)
        if encoded is None:
            encoded = encode_tiles(k_tiles, v_tiles, self.quant)
        slots = torch.tensor(self._n_tiles, device=dev)[tile_rows] + tile_idx
        self.store.write(tile_rows, slots, encoded)

        # New G-sized tail: the G slots after each row's completed tiles (slots past the row's
        # remainder hold finite leftovers, masked by tail_len). A grown buffer shrinks back here.
        idx = (done_t * g)[:, None] + torch.arange(g, device=dev)[None, :]
        row_ix = torch.arange(b, device=dev)[:, None]
        self.tail_k = self.tail_k[row_ix, :, idx].transpose(1, 2).contiguous()
        self.tail_v = self.tail_v[row_ix, :, idx].transpose(1, 2).contiguous()
        self._n_tiles = [n + c for n, c in zip(self._n_tiles, done, strict=True)]
        self._tail_len = [t % g for t in self._tail_len]

    def _settle_tail(self) -> None:
        """Before attention: quantize tiles deferred by ``record_past`` and bring the tail back to
        the ``[B, Hkv, G, D]`` layout of the storage contract."""
        g = self.tile_size
        if max(self._tail_len) >= g:
            self._complete_tiles()
            self._sync_counters()
        if self.tail_k.shape[2] > g:
            self.tail_k = self.tail_k[:, :, :g].contiguous()
            self.tail_v = self.tail_v[:, :, :g].contiguous()

    def activate_past_recording(self) -> None:
        """Called by transformers before generation that may roll back (assisted decoding).

        While on, tiles completed by a call are quantized at the start of the next update instead
        of at its end: a draft token that is then rejected and cropped has never been quantized,
        so every kept token is still quantized exactly once.
        """
        self.record_past = True

    # ---- generate support: beams, batch edits, crop ----------------------------------------------
    def _select_rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        if self.pending is not None:
            raise CacheUsageError("cannot reorder a KVarNCache layer in the middle of a forward call")
        index = index.to(device=self.device, dtype=torch.long)
        host = index.tolist()
        self.store.select_rows(index)
        self.sink_k, self.sink_v, self.tail_k, self.tail_v = (
            t.index_select(0, index) for t in (self.sink_k, self.sink_v, self.tail_k, self.tail_v)
        )
        self._n_tiles = [self._n_tiles[i] for i in host]
        self._sink_len = [self._sink_len[i] for i in host]
        self._tail_len = [self._tail_len[i] for i in host]
        self._trailing_real = [self._trailing_real[i] for i in host]
        self.batch = len(host)
        self._sync_counters()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select_rows(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``tokens_to_remove`` positions (a positive value is the legacy "keep this
        many" form of transformers).

        Tokens that return from a quantized tile to the tail come back as their *quantized* values
        (no 16-bit copy of the history is kept anywhere) and are quantized a second time when their
        tile completes again. transformers' assisted decoding avoids this: it turns on
        :meth:`activate_past_recording`, so the tiles a draft completes are not yet quantized when
        rejected drafts are cropped.
        """
        tokens_to_remove = int(tokens_to_remove)  # generate may pass a 0-d tensor
        if tokens_to_remove > 0:
            if tokens_to_remove >= self.columns:
                return
            tokens_to_remove = self.columns - tokens_to_remove
        n = abs(tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        if n > self.columns:
            raise CacheUsageError(f"cannot crop {n} positions from a layer holding {self.columns}")
        if any(n > t for t in self._trailing_real):
            raise CacheUsageError(
                f"cannot crop {n} positions: some row has padding among its last {n} positions"
            )
        g = self.tile_size
        cdt = _compute_dtype(self.dtype)
        for row, total in enumerate(self.stored_lengths()):
            keep = total - n
            sink, tiles = self._sink_len[row], self._n_tiles[row]
            if keep < sink:  # into the (16-bit) sink: nothing is stored after it
                self._sink_len[row], self._n_tiles[row], self._tail_len[row] = keep, 0, 0
            elif keep >= sink + tiles * g:  # only 16-bit tail tokens go
                self._tail_len[row] = keep - sink - tiles * g
            else:  # into a quantized tile: its first `rest` tokens return to the tail
                kept_tiles, rest = divmod(keep - sink, g)
                if rest:
                    k_tile, v_tile = decode_tiles(self.store.tile(row, kept_tiles), dtype=cdt)  # [H, G, D]
                    self.tail_k[row, :, :rest] = k_tile[:, :rest].to(self.dtype)
                    self.tail_v[row, :, :rest] = v_tile[:, :rest].to(self.dtype)
                self._n_tiles[row], self._tail_len[row] = kept_tiles, rest
        self._trailing_real = [t - n for t in self._trailing_real]
        self.columns -= n
        self._sync_counters()

    # ---- inspection ------------------------------------------------------------------------------
    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K/V ``[B, Hkv, S, D]`` in the ORIGINAL frame and model dtype (debugging only).

        Rows are left-padded with zeros to the longest row (``stored_lengths()`` gives each row's
        length), matching how transformers aligns a left-padded batch.
        """
        if not self.is_initialized:
            raise CacheUsageError(f"KVarNCache layer {self.layer_idx} is empty: nothing to materialize")
        cdt = _compute_dtype(self.dtype)
        lengths = self.stored_lengths()
        longest = max(lengths)
        shape = (self.batch, self.num_kv_heads, longest, self.head_dim)
        keys = torch.zeros(shape, dtype=cdt, device=self.device)
        values = torch.zeros_like(keys)
        for row, total in enumerate(lengths):
            parts_k = [self.sink_k[row, :, : self._sink_len[row]].to(cdt)]
            parts_v = [self.sink_v[row, :, : self._sink_len[row]].to(cdt)]
            if self._n_tiles[row]:
                k_t, v_t = decode_tiles(self.store.tiles(row, 0, self._n_tiles[row]), dtype=cdt)
                parts_k.append(k_t.reshape(self.num_kv_heads, -1, self.head_dim))
                parts_v.append(v_t.reshape(self.num_kv_heads, -1, self.head_dim))
            parts_k.append(self.tail_k[row, :, : self._tail_len[row]].to(cdt))
            parts_v.append(self.tail_v[row, :, : self._tail_len[row]].to(cdt))
            keys[row, :, longest - total :] = torch.cat(parts_k, dim=1)
            values[row, :, longest - total :] = torch.cat(parts_v, dim=1)
        if self.quant.rotate:
            keys, values = hadamard_transform(keys), hadamard_transform(values)
        return keys.to(self.dtype), values.to(self.dtype)

    def nbytes(self) -> dict[str, int]:
        """Bytes really held for this layer's stored tokens (valid slots only) plus allocation."""
        if not self.is_initialized:
            return {"codes": 0, "metadata": 0, "tail": 0, "sink": 0, "allocated": 0}
        per_tile = self.store.nbytes_per_tile()
        tiles = sum(self._n_tiles) * self.num_kv_heads
        token = 2 * self.num_kv_heads * self.head_dim * self.sink_k.element_size()  # K and V, all heads
        allocated = self.store.allocated_nbytes() + sum(
            t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.tail_k, self.tail_v)
        )
        return {
            "codes": tiles * per_tile["codes"],
            "metadata": tiles * per_tile["metadata"],
            "tail": sum(self._tail_len) * token,
            "sink": sum(self._sink_len) * token,
            "allocated": allocated,
        }

    def __repr__(self) -> str:
        return (
            f"KVarNLayer(layer_idx={self.layer_idx}, quant={self.quant.name}, batch={self.batch}, "
            f"columns={self.columns}, n_tiles={self._n_tiles})"
        )
