"""One full-attention layer of a KVarNCache: sink + packed tiles + tail (docs/layerstore.md).

Life of a forward call (transformers calls ``update`` before the attention function):

1. ``update(k, v)`` checks the inputs, stashes them as *pending* and returns them unchanged; it
   publishes them through ``kvarn.cache.handoff`` so the "kvarn" attention function can find
   this layer.
2. ``attend(module, query, new_valid, scaling)`` (called by the attention function, which knows
   the padding) computes the new tokens' attention over the cache *as it stood before the call*
   (sink and tail in the model dtype, completed tiles as packed codes) plus the new tokens at full
   precision (causal among themselves, padding masked); then stores the new tokens: rotated once
   (iff the method rotates), padding dropped per row, tiles that complete quantized in one batched
   call (the fused Triton kernel on CUDA, ``encode_tiles`` otherwise). A token is quantized
   exactly once, when its tile completes, and never again (except after a ``crop`` into a tile,
   see there).

Each row is aligned to its own first real token (left padding is never stored), so rows of a
padded batch are stored exactly as they would be alone; rows may hold different counts.

Two ways to store a call's tokens (docs/cache.md, "The decode step"):

* the **decode step** (``_decode_step``): every new token real, every row's sink full (or sinks
  off), and the new tokens fit in every row's tail. A fixed, short sequence of device ops, no host
  synchronization: the ``[B]`` counters the kernels read are updated on the device by the same
  arithmetic as their host mirrors, the tokens are written into the preallocated tail, and a tile
  is compressed when it fills;
* the **general commit** (``_commit``): prefill, padding, sink filling, tails overflowing. It may
  synchronize (it reads padding masks and uploads counters), and it works through the call in
  windows so that a long prefill never holds more than a window of extra 16-bit tokens.
"""

from __future__ import annotations

import json
import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from kvarn.attention.decode import quantized_decode_attention
from kvarn.attention.reference import quantized_attention_reference
from kvarn.attention.triton.dispatch import maybe_triton_compress
from kvarn.cache import handoff
from kvarn.cache.errors import (
    NOT_KVARN_ATTENTION,
    CacheFileError,
    CacheStateError,
    CacheUsageError,
    UnsupportedModelError,
)
from kvarn.cache.rotation import rotate_for_storage, rotate_queries
from kvarn.cache.storage import FIELDS, TileStore
from kvarn.codec import decode_tiles, encode_tiles
from kvarn.config import KVarNConfig
from kvarn.method.hadamard import hadamard_transform

# Calls with at most this many new tokens (all real) go through the decode seam (where a fused
# kernel can take over); longer ones (prefill) use the chunked reference with query blocks.
DECODE_MAX_QUERIES = 16
# A long call is stored in windows of about this many (token, KV head) pairs per window, so the
# tail buffer, the rotated copy and the gathered tiles of a prefill stay bounded (~2048 tokens
# for batch 8 x 8 KV heads).
COMMIT_WINDOW_PAIRS = 1 << 17
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in SUPPORTED_DTYPES}
# Tensors of a saved initialized layer (KVarNLayer.state): the valid tiles of every row, one after
# the other ([T, Hkv, ...], T = sum of n_tiles), the valid sink and tail tokens ([S, 2, Hkv, D]),
# and the host counters [4, B] (n_tiles, sink_len, tail_len, trailing_real).
STATE_TENSORS = (*FIELDS, "sink", "tail", "counters")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ragged(counts: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every valid slot of rows holding ``counts`` slots, row by row."""
    rows = [r for r, c in enumerate(counts) for _ in range(c)]
    pos = [p for c in counts for p in range(c)]
    index = torch.tensor([rows, pos], dtype=torch.long, device=device).reshape(2, -1)
    return index[0], index[1]


def _compress(k_tiles: torch.Tensor, v_tiles: torch.Tensor, quant: KVarNConfig):
    """Quantize tiles: the fused kernel on CUDA (same codes as ``encode_tiles`` except at exact
    rounding ties), ``encode_tiles`` otherwise."""
    encoded = maybe_triton_compress(k_tiles, v_tiles, quant)
    return encode_tiles(k_tiles, v_tiles, quant) if encoded is None else encoded


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
        self.reserved_tokens = 0  # KVarNCache.reserve: survives clearing, like the configuration
        self._clear()

    # ---- state ---------------------------------------------------------------------------------
    def _clear(self) -> None:
        self.is_initialized = False
        self.dtype = None
        self.device = None
        self.batch = 0
        self.store: TileStore | None = None
        # K and V of the sink and of the tail share one buffer each, [2, B, Hkv, G, D] (index 0 =
        # keys), so that a decode step writes both with one copy; sink_k, tail_v, ... are views.
        self._sink: torch.Tensor | None = None
        self._tail: torch.Tensor | None = None
        # Host mirrors of the [B] counters (control flow never reads the device) ...
        self._n_tiles: list[int] = []
        self._sink_len: list[int] = []
        self._tail_len: list[int] = []
        self._trailing_real: list[int] = []  # real tokens at the end of each row (for crop)
        # ... and the device counters the kernels read: one [3, B] int32 tensor, rows n_tiles,
        # sink_len, tail_len. Uploaded after general changes, updated in place by decode steps.
        self._counters: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # arange(B) on the device
        # Rows grouped by tail offset (rows with equal offsets complete their tiles together):
        # [(host rows, device index or None for "every row")], rebuilt after general changes.
        self._groups: list[tuple[list[int], torch.Tensor | None]] | None = None
        self.columns = 0  # positions consumed, padding included (what transformers counts)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._owner: weakref.ref | None = None
        self.record_past = False
        # Set by kvarn.integrations.cuda_graph while it captures / replays decode steps: the step
        # then only touches the device (see _append_to_tails) and the host catches up in
        # after_graph_step.
        self.graph_steps = False

    # Views of the shared buffers, named as in the storage contract (docs/layerstore.md).
    sink_k = property(lambda self: None if self._sink is None else self._sink[0])
    sink_v = property(lambda self: None if self._sink is None else self._sink[1])
    tail_k = property(lambda self: None if self._tail is None else self._tail[0])
    tail_v = property(lambda self: None if self._tail is None else self._tail[1])
    n_tiles = property(lambda self: None if self._counters is None else self._counters[0])
    sink_len = property(lambda self: None if self._counters is None else self._counters[1])
    tail_len = property(lambda self: None if self._counters is None else self._counters[2])

    def _tiles_for(self, tokens: int) -> int:
        """Completed tiles of a row holding ``tokens`` real tokens."""
        sink = self.tile_size if self.quant.keep_sink_tile else 0
        return max(0, tokens - sink) // self.tile_size

    def reserve(self, tokens: int) -> None:
        """Preallocate tile storage for rows of up to ``tokens`` real tokens (prompt + new).

        Without it the storage grows by half whenever it fills (amortized appends, up to a third
        of it spare, and old + new buffers alive while one layer grows); a caller who knows the
        final length gets exactly the tiles it needs, so a cache sized to the memory stays put.
        """
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"reserve takes a token count >= 0, got {tokens!r}")
        self.reserved_tokens = max(self.reserved_tokens, tokens)
        if self.store is not None:
            self.store.reserve(self._tiles_for(self.reserved_tokens), exact=True)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch = key_states.shape[0]
        b, h, g, d = self.batch, self.num_kv_heads, self.tile_size, self.head_dim
        self.store = TileStore(b, h, d, self.quant, self.device)
        if self.reserved_tokens:
            self.store.reserve(self._tiles_for(self.reserved_tokens), exact=True)
        self._sink = torch.zeros((2, b, h, g, d), dtype=self.dtype, device=self.device)
        self._tail = torch.zeros((2, b, h, g, d), dtype=self.dtype, device=self.device)
        self._n_tiles, self._sink_len, self._tail_len = [0] * b, [0] * b, [0] * b
        self._trailing_real = [0] * b
        self._rows = torch.arange(b, device=self.device)
        self._after_general_change()
        self.is_initialized = True

    def _after_general_change(self) -> None:
        """Upload the counters (one host-to-device copy) and regroup the rows by tail offset.

        Called after every change the decode step does not make itself (general commit, crop,
        row selection); the decode step then keeps both up to date on the device.
        """
        self._counters = torch.tensor(
            [self._n_tiles, self._sink_len, self._tail_len], dtype=torch.int32, device=self.device
        )
        by_offset: dict[int, list[int]] = {}
        for row, offset in enumerate(self._tail_len):
            by_offset.setdefault(offset, []).append(row)
        if len(by_offset) == 1:
            self._groups = [(list(range(self.batch)), None)]
            return
        groups = list(by_offset.values())
        flat = torch.tensor([r for rows in groups for r in rows], dtype=torch.long, device=self.device)
        self._groups = list(zip(groups, flat.split([len(rows) for rows in groups]), strict=True))

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

    # ---- attention -----------------------------------------------------------------------------
    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Hadamard rotation (self-inverse) of queries/outputs, rounded once to the model dtype."""
        return rotate_queries(x) if self.quant.rotate else x

    def _rotate_for_storage(self, x: torch.Tensor) -> torch.Tensor:
        """Hadamard rotation of tokens entering the cache (float64 product, see rotation.py)."""
        return rotate_for_storage(x) if self.quant.rotate else x

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
        (The "kvarn" attention function passes None when every token is real; a mask passed
        here is checked with one host sync.)
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

        if self.columns == 0 and new_valid is None:
            # Nothing stored yet and no padding: this is exactly the 16-bit prefill.
            out = F.scaled_dot_product_attention(
                query,
                keys,
                values,
                is_causal=length > 1,
                scale=scaling,
                enable_gqa=hq != self.num_kv_heads,
            )
            self._commit(keys, values, None, rotated=False)
            return out.transpose(1, 2)
        if new_valid is None and length <= DECODE_MAX_QUERIES and self._decode_step_applies(length):
            return self._decode_step(query, keys, values, scaling)

        q_rot = self._rotate(query)
        k_rot, v_rot = self._rotate_for_storage(keys), self._rotate_for_storage(values)
        attention = quantized_decode_attention
        extra = {"max_tiles": max(self._n_tiles), "min_tiles": min(self._n_tiles)}  # host bounds: no sync
        if new_valid is not None or length > DECODE_MAX_QUERIES:
            attention, extra["new_valid"] = quantized_attention_reference, new_valid
        out_rot = attention(*self._attention_args(q_rot, k_rot, v_rot, scaling), **extra)
        out = self._rotate(out_rot)
        self._commit(k_rot, v_rot, new_valid, rotated=True)
        return out.transpose(1, 2)

    def _attention_args(self, q_rot, new_k, new_v, scaling) -> tuple:
        """Positional arguments of the attention seam (storage contract order)."""
        st = self.store
        return (
            q_rot,
            st.k_codes,
            st.k_scale,
            st.k_zero,
            st.k_token_scale,
            st.v_codes,
            st.v_scale,
            st.v_zero,
            st.v_channel_scale,
            self.n_tiles,
            self.sink_k,
            self.sink_v,
            self.sink_len,
            self.tail_k,
            self.tail_v,
            self.tail_len,
            new_k,
            new_v,
            self.quant.key_bits,
            self.quant.value_bits,
            scaling,
        )

    # ---- the decode step ------------------------------------------------------------------------
    def _decode_step_applies(self, length: int) -> bool:
        """Host-side test (no device reads) that ``length`` real tokens per row can take the
        decode step: sinks full (or off), tails in the G-slot layout with room for the tokens."""
        g = self.tile_size
        if self._groups is None or self._tail.shape[3] != g or max(self._tail_len) + length > g:
            return False
        return not self.quant.keep_sink_tile or min(self._sink_len) == g

    def _decode_step(self, query, keys, values, scaling) -> torch.Tensor:
        """Attend and store ``L`` real tokens per row with a fixed sequence of device ops.

        Ops (one layer, rotation on): query rotation (1), the new K/V stacked and rotated for
        storage (4), the attention kernel, output rotation (1), the tail write (1; 2-3 when rows
        sit at different offsets), the tail counter (1); when a tail fills, the compression kernel
        plus ~12 small ops for the store and counters. No op reads device data on the host.
        """
        q_rot = self._rotate(query)
        kv = torch.stack((keys, values))  # [2, B, Hkv, L, D]
        if self.quant.rotate:
            kv = rotate_for_storage(kv)
        out_rot = quantized_decode_attention(
            *self._attention_args(q_rot, kv[0], kv[1], scaling),
            max_tiles=max(self._n_tiles),
            min_tiles=min(self._n_tiles),
        )
        out = self._rotate(out_rot)
        self._append_to_tails(kv)
        return out.transpose(1, 2)

    def _append_to_tails(self, kv: torch.Tensor) -> None:
        """Write ``kv [2, B, Hkv, L, D]`` at each row's tail offset; complete tiles that fill.

        The attention has been queued before: it read the counters as they were (same stream).
        """
        length = kv.shape[3]
        offsets = self._tail_len
        if self.graph_steps:
            # A replayed CUDA graph runs only the device ops recorded once, so the write position
            # must come from the device counter (never from a host offset baked into the graph),
            # and nothing host-side may happen here: after_graph_step does it after each replay.
            self._write_tails_at_device_offsets(kv)
            self.tail_len.add_(length)
            return
        if len(self._groups) == 1:  # every row at the same offset: one slice copy
            self._tail[:, :, :, offsets[0] : offsets[0] + length].copy_(kv)
        else:
            self._write_tails_at_device_offsets(kv)
        self.tail_len.add_(length)
        self._advance_host(length)

    def _write_tails_at_device_offsets(self, kv: torch.Tensor) -> None:
        """Write ``kv [2, B, Hkv, L, D]`` at each row's offset read from the device counter."""
        pos = self.tail_len.long().unsqueeze(1)
        if kv.shape[3] > 1:
            pos = pos + torch.arange(kv.shape[3], device=self.device)
        # advanced indices (rows, positions) come first in the result: [B, L, 2, Hkv, D]
        self._tail[:, self._rows.unsqueeze(1), :, pos] = kv.permute(1, 3, 0, 2, 4)

    def _advance_host(self, length: int) -> None:
        """Host mirrors after ``length`` tokens went into every row's tail (the device counter is
        already updated); quantize the tails that filled."""
        self._tail_len = [t + length for t in self._tail_len]
        self._trailing_real = [t + length for t in self._trailing_real]
        self.columns += length
        if self.record_past:  # tiles that fill wait for the next update (see activate_past_recording)
            return
        for rows, index in self._groups:
            if self._tail_len[rows[0]] == self.tile_size:
                self._complete_full_tails(rows, index)

    # ---- CUDA-graph decode steps (kvarn.integrations.cuda_graph) ---------------------------------
    def graph_step_ready(self, length: int = 1) -> str | None:
        """None when a decode step of ``length`` tokens per row can be recorded once and replayed:
        it would take the decode step (sinks full, G-slot tails with room), with no deferred
        tiles; else the reason it cannot (host-side test, no device reads)."""
        if not self.is_initialized:
            return "the layer holds no tokens yet (prefill first)"
        if self.record_past:
            return "past recording (assisted decoding) is on"
        if self.pending is not None:
            return "a forward call is in progress"
        if self._tail.shape[3] != self.tile_size or max(self._tail_len) >= self.tile_size:
            return "tiles are waiting to be quantized (the next eager step settles them)"
        if not self._decode_step_applies(length):
            if self.quant.keep_sink_tile and min(self._sink_len) < self.tile_size:
                return f"some row's 16-bit sink tile is not full yet ({min(self._sink_len)} of {self.tile_size} tokens)"
            return f"some row's tail has no room for {length} tokens"
        return None

    def graph_buffers(self) -> tuple:
        """Address and shape of every buffer a recorded decode step reads or writes; a replay is
        valid only while they are unchanged (tile storage that grows moves them)."""
        tensors = (self._sink, self._tail, self._counters, self._rows, *self.store.tensors().values())
        return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)

    def after_graph_step(self, length: int = 1) -> None:
        """The host side of a decode step that ran as a graph replay (or, on CPU, eagerly with
        ``graph_steps`` on): advance the host mirrors and quantize the tails that filled."""
        self._advance_host(length)

    def _complete_full_tails(self, rows: list[int], index: torch.Tensor | None) -> None:
        """Quantize the full tails of ``rows`` (device ``index``, None = every row) into the
        next tile slot of each row and empty those tails; no host reads of device data."""
        self.store.reserve(max(self._n_tiles[r] for r in rows) + 1)
        if index is None:
            k_tiles, v_tiles, slots = self.tail_k, self.tail_v, self.n_tiles
            index = self._rows
        else:
            full = self._tail.index_select(1, index)  # [2, R, Hkv, G, D]
            k_tiles, v_tiles, slots = full[0], full[1], self.n_tiles.index_select(0, index)
        self.store.write(index, slots.long(), _compress(k_tiles, v_tiles, self.quant))
        if len(rows) == self.batch:
            self.n_tiles.add_(1)
            self.tail_len.zero_()
        else:
            self.n_tiles.index_add_(0, index, torch.ones_like(index, dtype=torch.int32))
            self.tail_len.index_fill_(0, index, 0)
        for r in rows:
            self._n_tiles[r] += 1
            self._tail_len[r] = 0

    # ---- the general commit ---------------------------------------------------------------------
    def _commit(
        self, k: torch.Tensor, v: torch.Tensor, new_valid: torch.Tensor | None, rotated: bool
    ) -> None:
        """Append the real tokens of ``k, v [B, Hkv, L, D]`` to each row, window by window.

        ``rotated``: the tokens are already in the cache frame; otherwise each window is rotated
        as it is stored (so a long prefill never holds a rotated copy of the whole call).
        """
        b, h, length, _ = k.shape
        g = self.tile_size
        # Room for every tile this call can complete (plus the next), reserved once.
        self.store.reserve(
            max(n + (t + length) // g for n, t in zip(self._n_tiles, self._tail_len, strict=True)) + 1
        )
        window = max(g, COMMIT_WINDOW_PAIRS // max(1, b * h) // g * g)
        for w0 in range(0, length, window):
            kw, vw = k[:, :, w0 : w0 + window], v[:, :, w0 : w0 + window]
            if not rotated:
                kw, vw = self._rotate_for_storage(kw), self._rotate_for_storage(vw)
            valid = None if new_valid is None else new_valid[:, w0 : w0 + window]
            self._commit_window(kw, vw, valid)
        self._after_general_change()

    def _commit_window(self, k: torch.Tensor, v: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        """Tokens go to the sink while it has room, then to the tail; tiles the tail completes are
        quantized right away (one batched call for all rows and heads), or, while ``record_past``
        is on, at the start of the next update (see :meth:`activate_past_recording`)."""
        b, _, length, _ = k.shape
        g = self.tile_size
        dev = k.device
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
        kv = torch.stack((k, v), dim=2).transpose(1, 3)  # [B, L, 2, Hkv, D]: token-major for scattering
        starts = torch.tensor([self._sink_len, self._tail_len, to_sink], device=dev)  # [3, B]

        if any(to_sink):
            rows, cols = (valid & (rank < starts[2, :, None])).nonzero(as_tuple=True)
            dest = starts[0][rows] + rank[rows, cols]
            self._sink[:, rows, :, dest] = kv[rows, cols]

        self._reserve_tail((max(fill) // g + 1) * g)
        if new_valid is None and not any(to_sink) and len(set(self._tail_len)) == 1:
            t0 = self._tail_len[0]  # every row appends at the same offset
            self._tail[:, :, :, t0 : t0 + length] = torch.stack((k, v))
        elif any(f > t for f, t in zip(fill, self._tail_len, strict=True)):
            stream = valid & (rank >= starts[2, :, None])
            rows, cols = stream.nonzero(as_tuple=True)
            dest = starts[1][rows] + rank[rows, cols] - starts[2][rows]
            self._tail[:, rows, :, dest] = kv[rows, cols]

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

    def _reserve_tail(self, tokens: int) -> None:
        """Grow the tail buffer (zero-filled, a multiple of G) to hold ``tokens`` per row."""
        capacity = self._tail.shape[3]
        if tokens <= capacity:
            return
        g = self.tile_size
        new_capacity = -(-max(tokens, 2 * capacity) // g) * g
        grown = self._tail.new_zeros((*self._tail.shape[:3], new_capacity, self._tail.shape[4]))
        grown[:, :, :, :capacity] = self._tail
        self._tail = grown

    def _complete_tiles(self) -> None:
        """Quantize every complete tile held in the tails (one batched call for all rows, heads
        and tiles) and keep the remainder (< G tokens) as the new, G-sized tail."""
        g = self.tile_size
        done = [t // g for t in self._tail_len]
        if max(done) == 0:
            return
        b = self.batch
        dev = self._tail.device
        self._reserve_tail((max(self._tail_len) // g + 1) * g)  # room for each row's next G slots
        capacity = self._tail.shape[3]
        rows = [r for r in range(b) for _ in range(done[r])]
        tiles = [j for r in range(b) for j in range(done[r])]
        slots = [self._n_tiles[r] + j for r, j in zip(rows, tiles, strict=True)]
        index = torch.tensor([rows, tiles, slots], device=dev)  # one upload for all indices
        shape = (b, self.num_kv_heads, capacity // g, g, self.head_dim)
        k_tiles = self.tail_k.view(shape)[index[0], :, index[1]]  # [T, Hkv, G, D]
        v_tiles = self.tail_v.view(shape)[index[0], :, index[1]]
        self.store.reserve(max(slots) + 1)
        self.store.write(index[0], index[2], _compress(k_tiles, v_tiles, self.quant))

        # New G-sized tail: the G slots after each row's completed tiles (slots past the row's
        # remainder hold finite leftovers, masked by tail_len). A grown buffer shrinks back here.
        if len(set(done)) == 1:
            self._tail = self._tail[:, :, :, done[0] * g : (done[0] + 1) * g].contiguous()
        else:
            start = torch.tensor(done, device=dev)[:, None] * g
            idx = start + torch.arange(g, device=dev)[None, :]  # [B, G]
            self._tail = (
                self._tail[:, torch.arange(b, device=dev)[:, None], :, idx]
                .permute(2, 0, 3, 1, 4)
                .contiguous()
            )
        self._n_tiles = [n + c for n, c in zip(self._n_tiles, done, strict=True)]
        self._tail_len = [t % g for t in self._tail_len]

    def _settle_tail(self) -> None:
        """Before attention: quantize tiles deferred by ``record_past`` and bring the tail back to
        the ``[B, Hkv, G, D]`` layout of the storage contract."""
        g = self.tile_size
        changed = False
        if max(self._tail_len) >= g:
            self._complete_tiles()
            changed = True
        if self._tail.shape[3] > g:
            self._tail = self._tail[:, :, :, :g].contiguous()
        if changed:
            self._after_general_change()

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
        self._sink = self._sink.index_select(1, index)
        self._tail = self._tail.index_select(1, index)
        self._n_tiles = [self._n_tiles[i] for i in host]
        self._sink_len = [self._sink_len[i] for i in host]
        self._tail_len = [self._tail_len[i] for i in host]
        self._trailing_real = [self._trailing_real[i] for i in host]
        self.batch = len(host)
        self._rows = torch.arange(self.batch, device=self.device)
        self._after_general_change()

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
        self._after_general_change()

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

    # ---- saving and loading (kvarn.save_cache / kvarn.load_cache) ---------------------------------
    def _check_at_rest(self) -> None:
        """Raise CacheStateError unless the layer is between calls with nothing deferred."""
        where = f"cannot save KVarNCache layer {self.layer_idx}:"
        if self.pending is not None:
            raise CacheStateError(f"{where} a forward call is in progress (update ran, attention did not)")
        if self.graph_steps:
            raise CacheStateError(
                f"{where} a CUDA-graph decoder drives it (save before or after GraphDecoder)"
            )
        if self.record_past:
            raise CacheStateError(
                f"{where} past recording (assisted decoding) is on: completed tiles may wait to be "
                "quantized and rejected drafts to be cropped; save a cache filled by plain generate/forward"
            )
        if self.is_initialized and (
            self._tail.shape[3] != self.tile_size or max(self._tail_len) >= self.tile_size
        ):
            raise CacheStateError(f"{where} tiles are waiting to be quantized")

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str | int]]:
        """What is needed to continue: ``(tensors, metadata)``, see :meth:`from_state`.

        Only valid slots are kept: each row's completed tiles, sink and tail tokens, packed one
        row after the other (no spare capacity, no padding), so the tensors take ``nbytes()``
        minus ``allocated`` plus the 4 x B counters. Raises CacheStateError if the layer is not
        at rest (see :meth:`_check_at_rest`).
        """
        self._check_at_rest()
        meta: dict[str, str | int] = {
            "kind": "kvarn",
            "layer_idx": self.layer_idx,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "tile_size": self.tile_size,
            "quant": json.dumps(self.quant.to_dict(), sort_keys=True),
            "initialized": int(self.is_initialized),
        }
        if not self.is_initialized:
            return {}, meta
        meta.update(batch=self.batch, columns=self.columns, dtype=str(self.dtype).removeprefix("torch."))
        rows, slots = _ragged(self._n_tiles, self.device)
        tensors = {name: t[rows, :, slots] for name, t in self.store.tensors().items()}
        for name, buffer, counts in (
            ("sink", self._sink, self._sink_len),
            ("tail", self._tail, self._tail_len),
        ):
            rows, pos = _ragged(counts, self.device)
            tensors[name] = buffer[:, rows, :, pos]  # [S, 2, Hkv, D]
        tensors["counters"] = torch.tensor(
            [self._n_tiles, self._sink_len, self._tail_len, self._trailing_real], dtype=torch.int64
        )
        return tensors, meta

    @classmethod
    def from_state(
        cls,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, str | int],
        model_config=None,
        device: torch.device | str | None = None,
    ) -> KVarNLayer:
        """The layer :meth:`state` described, on ``device`` (default: where the tensors are).

        ``model_config`` is the model config whose attention implementation the layer checks
        (as in ``KVarNCache``). Raises CacheFileError when a tensor is missing or does not fit
        the counters. Reserved capacity is not restored (call ``reserve`` again).
        """
        where = f"saved KVarN layer {meta.get('layer_idx')}"
        try:
            quant = KVarNConfig.from_dict(json.loads(meta["quant"]))
            layer = cls(
                quant, int(meta["layer_idx"]), int(meta["num_kv_heads"]), int(meta["head_dim"]), model_config
            )
            if not meta["initialized"]:
                return layer
            dtype, batch, columns = DTYPE_NAMES[meta["dtype"]], int(meta["batch"]), int(meta["columns"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheFileError(f"{where}: bad metadata {meta!r} ({type(exc).__name__}: {exc})") from exc
        missing = [name for name in STATE_TENSORS if name not in tensors]
        if missing:
            raise CacheFileError(f"{where}: missing tensors {missing}")
        counters = tensors["counters"].tolist()
        if tensors["counters"].shape != (4, batch):
            raise CacheFileError(
                f"{where}: counters of shape {tuple(tensors['counters'].shape)}, expected (4, {batch})"
            )
        if device is None:
            device = tensors["tail"].device
        h, d = layer.num_kv_heads, layer.head_dim
        empty = torch.empty((batch, h, 0, d), dtype=dtype, device=device)
        layer.lazy_initialization(empty, empty)
        layer._n_tiles, layer._sink_len, layer._tail_len, layer._trailing_real = counters
        g = layer.tile_size
        if (
            min(min(c) for c in counters) < 0
            or max(layer._sink_len) > (g if quant.keep_sink_tile else 0)
            or max(layer._tail_len) >= g
            or max(layer.stored_lengths()) > columns
        ):
            raise CacheFileError(f"{where}: counters out of range for tile size {g}: {counters}")
        store = layer.store
        store.reserve(max(layer._n_tiles), exact=True)
        expected = {name: (sum(layer._n_tiles), h, *store._layout[name][0]) for name in FIELDS}
        for name, counts in (("sink", layer._sink_len), ("tail", layer._tail_len)):
            expected[name] = (sum(counts), 2, h, d)
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise CacheFileError(
                    f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the counters need {shape}"
                )
        rows, slots = _ragged(layer._n_tiles, device)
        for name in FIELDS:
            getattr(store, name)[rows, :, slots] = tensors[name].to(
                device=device, dtype=store._layout[name][1]
            )
        for buffer, name, counts in (
            (layer._sink, "sink", layer._sink_len),
            (layer._tail, "tail", layer._tail_len),
        ):
            rows, pos = _ragged(counts, device)
            buffer[:, rows, :, pos] = tensors[name].to(device=device, dtype=dtype)
        layer.columns = columns
        layer._after_general_change()
        return layer

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
