"""The seam between storage and execution: ``quantized_decode_attention`` (docs/layerstore.md).

The cache calls this for calls whose new tokens are all real (decode steps, short multi-token
steps such as assisted-decoding verification). It picks a backend in ONE place,
``_select_backend``: CUDA tensors go to the fused Triton kernel (``kvarn.attention.triton``) when
it covers the shape, everything else to the PyTorch twin
(``kvarn.attention.reference.quantized_attention_reference``), which is also the kernel's oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvarn.attention.reference import quantized_attention_reference
from kvarn.attention.triton.dispatch import enabled_for, maybe_triton_decode

Backend = Callable[..., torch.Tensor]


def _select_backend(query: torch.Tensor) -> Backend:
    """The one place where the backend is chosen: the fused Triton kernel for CUDA tensors (when
    Triton is usable and the shape is covered; ``kvarn.attention.triton.dispatch``), otherwise the
    PyTorch twin, which stays the kernel's test oracle."""
    if enabled_for(query):
        return _triton_or_reference
    return quantized_attention_reference


def _triton_or_reference(*args, max_tiles=None, min_tiles=None) -> torch.Tensor:
    out = maybe_triton_decode(*args)
    if out is None:  # a shape or dtype the kernel does not cover
        return quantized_attention_reference(*args, max_tiles=max_tiles, min_tiles=min_tiles)
    return out


def quantized_decode_attention(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_token_scale: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    v_channel_scale: torch.Tensor,
    n_tiles: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    sink_len: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_len: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    key_bits: int,
    value_bits: int,
    scaling: float,
    *,
    max_tiles: int | None = None,
    min_tiles: int | None = None,
) -> torch.Tensor:
    """Attention of the rotated ``query [B, Hq, L, D]`` over one layer's storage plus new tokens.

    Args (all in the cache frame; ``[B, Hkv, ...]`` layouts of docs/layerstore.md):
        query: ``[B, Hq, L, D]``, ``Hq = Hkv * group``; L new queries (1 for decode).
        k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale:
            packed tiles and folded metadata, ``[B, Hkv, Ncap, ...]``.
        n_tiles: ``[B]`` int32, valid tiles per row.
        sink_k, sink_v, sink_len / tail_k, tail_v, tail_len: ``[B, Hkv, G, D]`` dense buffers and
            their ``[B]`` int32 valid lengths.
        new_k, new_v: ``[B, Hkv, L, D]`` this call's tokens, all real, causal among themselves.
        key_bits, value_bits: code widths; scaling: softmax scale.
        max_tiles, min_tiles: optional host-side bounds of ``n_tiles`` (save a device sync and
            masking work); a kernel may ignore them.

    Returns ``[B, Hq, L, D]`` in the rotated frame, dtype of ``query``.
    """
    return _select_backend(query)(
        query,
        k_codes,
        k_scale,
        k_zero,
        k_token_scale,
        v_codes,
        v_scale,
        v_zero,
        v_channel_scale,
        n_tiles,
        sink_k,
        sink_v,
        sink_len,
        tail_k,
        tail_v,
        tail_len,
        new_k,
        new_v,
        key_bits,
        value_bits,
        scaling,
        max_tiles=max_tiles,
        min_tiles=min_tiles,
    )
