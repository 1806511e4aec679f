"""Use the Triton kernels when they apply, otherwise say so (None) and let the caller run PyTorch.

The cache and the attention backend call these two functions unconditionally; they return None
for CPU tensors, when Triton or CUDA is missing, for shapes the kernels do not cover, or when the
environment variable ``KVARN_DISABLE_TRITON=1`` is set (to compare against the PyTorch path).
Nothing here imports Triton unless a CUDA tensor arrives and Triton is usable.
"""

from __future__ import annotations

import os

import torch

from kvarn.attention.triton import available
from kvarn.codec import QuantizedTiles
from kvarn.config import KVarNConfig


def enabled_for(x: torch.Tensor) -> bool:
    """A CUDA tensor, Triton usable, and not switched off by KVARN_DISABLE_TRITON."""
    if not x.is_cuda or os.environ.get("KVARN_DISABLE_TRITON", "0") not in ("", "0"):
        return False
    return available()


# Decode kernels: "warp" (decode_warp.py: one warp per program, codes as the tensor-core A operand;
# the fastest; needs >= 16 key words per channel row and >= 16 value words per token), "tc"
# (decode_tc.py: bit planes on tensor cores) and "chunked" (decode_chunked.py: token chunks, hi/lo
# bf16 operands; takes float32 models and the small tiles tc declines). A kernel runs by default
# only once it has passed scripts/gpu_check.py on a GPU; KVARN_DECODE_KERNEL=warp|tc|chunked
# forces one (benchmarks, checks).
DECODE_MODULES = {
    "warp": "kvarn.attention.triton.decode_warp",
    "tc": "kvarn.attention.triton.decode_tc",
    "chunked": "kvarn.attention.triton.decode_chunked",
}
# GPU-checked kernels, fastest first (H200, docs/gpu.md).
GPU_CHECKED_DECODE = ("warp", "tc", "chunked")


def decode_kernel_order() -> tuple[str, ...]:
    """Decode kernels to try, in order (the first whose ``supports`` accepts the shapes runs)."""
    forced = os.environ.get("KVARN_DECODE_KERNEL", "").strip().lower()
    if forced in DECODE_MODULES:
        return (forced,)
    if forced:
        raise ValueError(f"KVARN_DECODE_KERNEL={forced!r}: expected one of {sorted(DECODE_MODULES)}")
    return GPU_CHECKED_DECODE


def decode_unsupported_reason(
    device: torch.device,
    head_dim: int,
    tile_size: int,
    key_bits: int,
    value_bits: int,
    num_queries: int,
    dtype,
) -> str | None:
    """None when a Triton decode kernel will take these shapes on ``device``, else why not."""
    probe = torch.empty(0, device=device)
    if not enabled_for(probe):
        return f"the Triton kernels are off for {device} (CUDA device, Triton importable, KVARN_DISABLE_TRITON unset)"
    import importlib

    reasons = []
    for name in decode_kernel_order():
        reason = importlib.import_module(DECODE_MODULES[name]).supports(
            head_dim, tile_size, key_bits, value_bits, num_queries, dtype
        )
        if reason is None:
            return None
        reasons.append(f"{name}: {reason}")
    return "; ".join(reasons)


def maybe_triton_decode(
    query, k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale,
    n_tiles, sink_k, sink_v, sink_len, tail_k, tail_v, tail_len, new_k, new_v,
    key_bits, value_bits, scaling, *, max_tiles: int | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """``quantized_decode_attention`` on the fused kernel, or None when it does not apply."""
    if not enabled_for(query):
        return None
    import importlib

    for name in decode_kernel_order():
        kernel = importlib.import_module(DECODE_MODULES[name])
        reason = kernel.supports(
            query.shape[-1], k_token_scale.shape[-1], key_bits, value_bits, query.shape[2], query.dtype
        )
        if reason is None:
            break
    else:
        return None
    return kernel.quantized_decode_attention(
        query, k_codes, k_scale, k_zero, k_token_scale, v_codes, v_scale, v_zero, v_channel_scale,
        n_tiles, sink_k, sink_v, sink_len, tail_k, tail_v, tail_len, new_k, new_v,
        key_bits, value_bits, scaling,
    )  # fmt: skip


def maybe_triton_compress(
    k_tiles: torch.Tensor, v_tiles: torch.Tensor, config: KVarNConfig
) -> QuantizedTiles | None:
    """``kvarn.codec.encode_tiles`` on the fused kernel, or None when it does not apply."""
    if not enabled_for(k_tiles):
        return None
    from kvarn.attention.triton import compress

    if compress.supports(config, k_tiles.shape[-1], k_tiles.dtype) is not None:
        return None
    return compress.compress_tiles(k_tiles, v_tiles, config)
