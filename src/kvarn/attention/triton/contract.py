"""Host-side checks and buffers shared by the decode kernels' wrappers (docs/layerstore.md).

Both decode kernels take the same layer storage and return the same thing; what differs is the
kernel. Input validation (shapes, dtypes, one device: clear errors instead of garbage), the
stride-preserving layout fix-up and the output buffer live here once (the split-K
pieces are in ``split_k.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

STORAGE = (
    "k_codes", "k_scale", "k_zero", "k_token_scale", "v_codes", "v_scale", "v_zero", "v_channel_scale",
    "n_tiles", "sink_k", "sink_v", "sink_len", "tail_k", "tail_v", "tail_len", "new_k", "new_v",
)  # fmt: skip


def check(name: str, x: torch.Tensor, shape: tuple, dtype=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {dtype}")


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def inner_contiguous(x: torch.Tensor, inner: int) -> torch.Tensor:
    """Keep the layout when the last ``inner`` dims are dense (slices of a capacity buffer are):
    the kernels index the leading dims by stride and assume the innermost dims dense."""
    if x.is_contiguous():
        return x
    shape, stride = x.shape[-inner:], x.stride()[-inner:]
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride), strict=True):
        if size > 1 and st != expected:
            return x.contiguous()
        expected *= size
    return x


def shape_unsupported_reason(
    head_dim: int, tile_size: int, key_bits: int, value_bits: int, num_queries: int, dtype,
    kernel_bits: tuple, max_queries: int,
) -> str | None:  # fmt: skip
    """What the tensor-core decode kernels share in ``supports``: float16/bfloat16, the bit
    widths they decode, power-of-two head_dim in [16, 256] and tile_size <= 256, 1..max_queries
    new queries per row. None when those hold, else the reason."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not float16/bfloat16"
    if key_bits not in kernel_bits or value_bits not in kernel_bits:
        return f"key_bits={key_bits}, value_bits={value_bits}: the kernel decodes {list(kernel_bits)} bits"
    if not is_pow2(head_dim) or not 16 <= head_dim <= 256:
        return f"head_dim={head_dim} is not a power of two in [16, 256]"
    if not is_pow2(tile_size) or tile_size > 256:
        return f"tile_size={tile_size} is not a power of two <= 256"
    if not 1 <= num_queries <= max_queries:
        return f"{num_queries} new queries per row; the kernel takes 1..{max_queries}"
    return None


def check_decode_inputs(
    query: torch.Tensor, st: dict, key_bits: int, value_bits: int,
    supports: Callable[..., str | None], kernel: str, dense_in_query_dtype: bool,
) -> tuple[int, int, int, int, int, int, int]:  # fmt: skip
    """Validate ``query`` and the storage tensors ``st`` (names of ``STORAGE``).

    Returns ``(batch, query heads, queries, head_dim, kv heads, capacity, tile size)``. With
    ``dense_in_query_dtype`` the 16-bit segments (sink, tail, new tokens) must share the query's dtype.
    """
    if query.ndim != 4:
        raise ValueError(f"query must be [B, Hq, L, D], got shape {tuple(query.shape)}")
    bsz, hq, nq, hd = query.shape
    k_codes = st["k_codes"]
    if k_codes.ndim != 5:
        raise ValueError(f"k_codes must be [B, Hkv, Ncap, D, G*kb/8], got shape {tuple(k_codes.shape)}")
    hkv, ncap = k_codes.shape[1], k_codes.shape[2]
    g = st["k_token_scale"].shape[-1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    reason = supports(hd, g, key_bits, value_bits, nq, query.dtype)
    if reason:
        raise ValueError(f"the {kernel} decode kernel does not handle this input: {reason}")
    md = st["k_scale"].dtype
    check("k_codes", k_codes, (bsz, hkv, ncap, hd, g * key_bits // 8), torch.uint8)
    check("k_scale", st["k_scale"], (bsz, hkv, ncap, hd))
    check("k_zero", st["k_zero"], (bsz, hkv, ncap, hd), md)
    check("k_token_scale", st["k_token_scale"], (bsz, hkv, ncap, g), md)
    check("v_codes", st["v_codes"], (bsz, hkv, ncap, g, hd * value_bits // 8), torch.uint8)
    check("v_scale", st["v_scale"], (bsz, hkv, ncap, g), md)
    check("v_zero", st["v_zero"], (bsz, hkv, ncap, g), md)
    check("v_channel_scale", st["v_channel_scale"], (bsz, hkv, ncap, hd), md)
    for name in ("n_tiles", "sink_len", "tail_len"):
        check(name, st[name], (bsz,), torch.int32)
    dense = query.dtype if dense_in_query_dtype else None
    for name in ("sink_k", "sink_v", "tail_k", "tail_v"):
        check(name, st[name], (bsz, hkv, g, hd), dense)
    check("new_k", st["new_k"], (bsz, hkv, nq, hd), dense)
    check("new_v", st["new_v"], (bsz, hkv, nq, hd), dense)
    devs = {t.device for t in (query, k_codes, st["n_tiles"], st["sink_k"], st["tail_k"], st["new_k"])}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(x) for x in devs)}")
    return bsz, hq, nq, hd, hkv, ncap, g


def kernel_layout(query: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
    """``query`` and ``st`` with every tensor's inner dims dense (codes: the last two)."""
    out = {}
    for name, x in st.items():
        if name in ("n_tiles", "sink_len", "tail_len"):
            out[name] = x.contiguous()  # the kernels read row b's length at offset b (a no-op if dense)
        else:
            out[name] = inner_contiguous(x, 2 if name.endswith("_codes") else 1)
    return inner_contiguous(query, 1), out


def output_buffer(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh output, or the caller's (e.g. a static buffer for CUDA-graph capture), checked."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check("out", out, shape, dtype)
    if out.stride(-1) != 1:
        raise ValueError("out must have a contiguous last dim")
    return out
