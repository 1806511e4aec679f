"""Token-chunked decode attention kernel (the fallback) vs its plain PyTorch twin, under Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
pytest.importorskip("triton", reason="triton is not installed (optional dependency)")

from kvarn.attention.triton.reference import quantized_decode_attention_reference  # noqa: E402
from kvarn.attention.triton.testing import random_layer_storage, relative_error  # noqa: E402
from kvarn.config import KVarNConfig  # noqa: E402

decode = pytest.importorskip("kvarn.attention.triton.decode_chunked")

# Relative error budget against a float64 reference: the kernel accumulates in float32 and its
# bf16 hi+lo operand split keeps ~16 bits, so float32 outputs land near 1e-5; 16-bit outputs are
# dominated by the final rounding to the output dtype.
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check(kw, dtype, **launch):
    out = decode.quantized_decode_attention(**kw, **launch)
    ref = quantized_decode_attention_reference(
        **{**kw, "query": kw["query"].double()}, compute_dtype=torch.float64
    )
    assert out.shape == kw["query"].shape and out.dtype == kw["query"].dtype
    err = relative_error(out, ref)
    assert err < TOL[dtype], f"relative error {err}"
    return out


CASES = [
    # group, L, head_dim, tile, kb, vb, dtype, n_tiles, sink_len, tail_len
    (1, 1, 64, 32, 4, 2, torch.float32, [3, 0], [32, 7], [5, 31]),
    (4, 1, 64, 32, 4, 2, torch.bfloat16, [2, 5], [32, 32], [0, 17]),
    (8, 1, 64, 32, 2, 4, torch.float16, [4, 1], [32, 0], [31, 0]),
    (4, 3, 64, 32, 4, 4, torch.float32, [1, 3], [11, 32], [1, 9]),
    (2, 5, 32, 64, 2, 2, torch.bfloat16, [2, 0], [64, 3], [63, 0]),
    (1, 2, 128, 32, 8, 8, torch.float32, [2, 1], [32, 32], [0, 4]),
]


@pytest.mark.parametrize("group,nq,d,g,kb,vb,dtype,nt,sl,tl", CASES)
def test_decode_matches_reference(group, nq, d, g, kb, vb, dtype, nt, sl, tl):
    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=g)
    kw = random_layer_storage(
        batch=len(nt), kv_heads=2, group=group, num_queries=nq, head_dim=d, config=cfg,
        n_tiles=nt, sink_len=sl, tail_len=tl, capacity=max(nt) + 1, dtype=dtype,
    )  # fmt: skip
    _check(kw, dtype, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_count_does_not_change_result(num_splits):
    """More splits than tiles leaves empty splits; they must merge away cleanly."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float32)
    kw = random_layer_storage(
        batch=2, kv_heads=1, group=4, num_queries=1, head_dim=64, config=cfg,
        n_tiles=[5, 2], sink_len=[32, 32], tail_len=[3, 30], capacity=6, dtype=torch.float32,
    )  # fmt: skip
    _check(kw, torch.float32, num_splits=num_splits)


def test_decode_multi_query_many_rows():
    """group 8 x 16 queries = 128 rows: two M blocks, causal among the 16 new tokens."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32)
    kw = random_layer_storage(
        batch=1, kv_heads=1, group=8, num_queries=16, head_dim=64, config=cfg,
        n_tiles=[2], sink_len=[32], tail_len=[13], capacity=3, dtype=torch.float32,
    )  # fmt: skip
    _check(kw, torch.float32, num_splits=2)


def test_decode_head_dim_256_fp16_metadata():
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float16)
    kw = random_layer_storage(
        batch=1, kv_heads=1, group=2, num_queries=1, head_dim=256, config=cfg,
        n_tiles=[2], sink_len=[32], tail_len=[6], capacity=2, dtype=torch.bfloat16,
    )  # fmt: skip
    _check(kw, torch.bfloat16)


def test_decode_reads_capacity_slices_in_place():
    """Storage tensors that are views of a larger capacity buffer (non-contiguous) work."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32)
    kw = random_layer_storage(
        batch=2, kv_heads=2, group=2, num_queries=1, head_dim=64, config=cfg,
        n_tiles=[3, 1], sink_len=[32, 32], tail_len=[2, 0], capacity=5, dtype=torch.float32,
    )  # fmt: skip
    for name in (
        "k_codes",
        "k_scale",
        "k_zero",
        "k_token_scale",
        "v_codes",
        "v_scale",
        "v_zero",
        "v_channel_scale",
    ):
        kw[name] = kw[name][:, :, :4]
        assert not kw[name].is_contiguous()
    _check(kw, torch.float32, num_splits=2)


def test_decode_rejects_bad_input():
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32)
    kw = random_layer_storage(
        batch=1, kv_heads=2, group=2, num_queries=1, head_dim=64, config=cfg,
        n_tiles=[1], sink_len=[32], tail_len=[0], dtype=torch.float32,
    )  # fmt: skip
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode.quantized_decode_attention(**{**kw, "query": kw["query"][:, :3]})
    with pytest.raises(ValueError, match="decodes"):
        decode.quantized_decode_attention(**{**kw, "key_bits": 3})
    with pytest.raises(ValueError, match="k_codes has shape"):
        decode.quantized_decode_attention(**{**kw, "k_codes": kw["k_codes"][..., :8]})
    with pytest.raises(TypeError, match="n_tiles has dtype"):
        decode.quantized_decode_attention(**{**kw, "n_tiles": kw["n_tiles"].long()})
    with pytest.raises(ValueError, match="new_k has shape"):
        decode.quantized_decode_attention(**{**kw, "new_k": kw["new_k"][:, :1]})
