"""Tensor-core (bit-plane) decode attention kernel vs its plain PyTorch twin, under Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
pytest.importorskip("triton", reason="triton is not installed (optional dependency)")

from kvarn.attention.triton.reference import quantized_decode_attention_reference  # noqa: E402
from kvarn.attention.triton.testing import random_layer_storage, relative_error  # noqa: E402
from kvarn.config import KVarNConfig  # noqa: E402

decode_tc = pytest.importorskip("kvarn.attention.triton.decode_tc")


def _reference(kw):
    return quantized_decode_attention_reference(
        **{**kw, "query": kw["query"].double()}, compute_dtype=torch.float64
    )


def _check(kw, **launch):
    """Error within a few times the output dtype's own rounding of the float64 result.

    The interpreter truncates float32 -> bfloat16 casts (it does not round), which alone doubles
    the bf16 rounding error: measured 1.7-2.2x the rounding floor over 12 seeds, the same as the
    GPU-checked v2 kernel on the same inputs, hence 3x; float16 rounds correctly (~1.05-1.3x).
    A real defect gives errors of order 1.
    """
    out = decode_tc.quantized_decode_attention(**kw, **launch)
    ref = _reference(kw)
    assert out.shape == kw["query"].shape and out.dtype == kw["query"].dtype
    err = relative_error(out, ref)
    floor = relative_error(ref.to(out.dtype), ref)
    factor = 3.0 if out.dtype == torch.bfloat16 else 2.0
    assert err < factor * floor + 1e-4, f"relative error {err} (output rounding alone {floor})"
    return out


CASES = [
    # group, L, head_dim, tile, kb, vb, dtype, n_tiles, sink_len, tail_len
    (1, 1, 64, 32, 4, 2, torch.bfloat16, [3, 0], [32, 7], [5, 31]),
    (4, 1, 64, 32, 4, 2, torch.float16, [2, 5], [32, 32], [0, 17]),
    (8, 1, 64, 64, 2, 4, torch.bfloat16, [4, 1], [64, 0], [63, 0]),
    (4, 3, 64, 32, 4, 4, torch.float16, [1, 3], [11, 32], [1, 9]),
    (2, 5, 128, 64, 2, 2, torch.bfloat16, [2, 0], [64, 3], [63, 0]),
    (1, 2, 128, 32, 8, 8, torch.float16, [2, 1], [32, 32], [0, 4]),
]


@pytest.mark.parametrize("group,nq,d,g,kb,vb,dtype,nt,sl,tl", CASES)
def test_decode_tc_matches_reference(group, nq, d, g, kb, vb, dtype, nt, sl, tl):
    """GQA 1/4/8, multi-query, odd per-row lengths (incl. no tiles, empty sink), NaN in invalid slots."""
    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=g)
    kw = random_layer_storage(
        batch=len(nt), kv_heads=2, group=group, num_queries=nq, head_dim=d, config=cfg,
        n_tiles=nt, sink_len=sl, tail_len=tl, capacity=max(nt) + 1, dtype=dtype,
    )  # fmt: skip
    _check(kw, num_splits=2)


# variant="words" needs key word planes of >= 16 tokens (tile_size * key_bits >= 256).
WORDS_CASES = [
    # group, L, head_dim, tile, kb, vb, dtype, n_tiles, sink_len, tail_len, meta_ahead
    (4, 1, 64, 64, 4, 2, torch.bfloat16, [3, 0], [64, 7], [5, 63], 0),
    (1, 2, 64, 128, 2, 4, torch.float16, [2, 1], [128, 0], [3, 9], 2),
    (2, 1, 128, 32, 8, 8, torch.float16, [2, 1], [32, 32], [0, 4], 1),
    (4, 3, 64, 64, 4, 2, torch.float16, [1, 2], [11, 64], [1, 9], 2),
    (8, 1, 64, 64, 4, 8, torch.bfloat16, [2, 2], [64, 64], [17, 0], 1),
    (2, 1, 256, 64, 4, 2, torch.bfloat16, [2, 1], [64, 64], [6, 0], 0),
]


@pytest.mark.parametrize("group,nq,d,g,kb,vb,dtype,nt,sl,tl,meta_ahead", WORDS_CASES)
def test_decode_tc_words_variant_matches_reference(group, nq, d, g, kb, vb, dtype, nt, sl, tl, meta_ahead):
    """variant="words" (key codes as 16-bit words, one softmax step per tile; meta_ahead 0 / 1 / 2:
    none / key channel / all metadata one tile ahead): bits 2/4/8 for keys and values, D 64/128/256,
    GQA, multi-query, odd lengths."""
    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=g)
    kw = random_layer_storage(
        batch=len(nt), kv_heads=2, group=group, num_queries=nq, head_dim=d, config=cfg,
        n_tiles=nt, sink_len=sl, tail_len=tl, capacity=max(nt) + 1, dtype=dtype,
    )  # fmt: skip
    _check(kw, num_splits=2, variant="words", meta_ahead=meta_ahead)


# code_operands="subnormal": the same words kernel with codes fed as subnormal float16 (no fma).
SUBNORMAL_CASES = [
    # group, L, head_dim, tile, kb, vb, dtype, n_tiles, sink_len, tail_len, num_splits, m_block
    (4, 1, 64, 64, 4, 2, torch.bfloat16, [3, 0], [64, 7], [5, 63], 1, 4),  # 3 tiles in one split
    (1, 2, 64, 128, 2, 4, torch.float16, [2, 1], [128, 0], [3, 9], 2, None),  # K2: 8 fields, 3 shifted
    (2, 1, 128, 32, 8, 8, torch.float16, [4, 1], [32, 32], [0, 31], 1, None),  # K8V8, 4 tiles per split
    (8, 1, 64, 128, 2, 2, torch.bfloat16, [2, 2], [128, 1], [127, 0], 2, 8),  # K2V2, tile boundaries
]


@pytest.mark.parametrize("group,nq,d,g,kb,vb,dtype,nt,sl,tl,num_splits,m_block", SUBNORMAL_CASES)
def test_decode_tc_subnormal_code_operands_match_fma_twin_and_reference(
    group, nq, d, g, kb, vb, dtype, nt, sl, tl, num_splits, m_block
):
    """code_operands="subnormal" vs the float64 reference and vs the fma path: the two differ
    only by exact powers of two inside the products, so the outputs are bit for bit equal (here:
    float32 products; on the GPU if the tensor cores take float16 subnormals exactly). K2/K4/K8
    keys (fields in place and shifted), V2/V4/V8, bf16 (one operand) and float16 (two), GQA,
    multi-query, odd lengths, tile boundaries, several tiles per split, outliers."""
    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=g)
    kw = random_layer_storage(
        batch=len(nt), kv_heads=2, group=group, num_queries=nq, head_dim=d, config=cfg,
        n_tiles=nt, sink_len=sl, tail_len=tl, capacity=max(nt) + 1, dtype=dtype,
    )  # fmt: skip
    launch = dict(num_splits=num_splits, variant="words", m_block=m_block)
    out = _check(kw, **launch, code_operands="subnormal")
    assert torch.equal(out, decode_tc.quantized_decode_attention(**kw, **launch, code_operands="fma"))


@pytest.mark.parametrize("num_splits,meta_ahead", [(1, 2), (8, 1)])
def test_decode_tc_words_split_count_and_row_blocks(num_splits, meta_ahead):
    """variant="words": empty splits, runs of one tile (the look-ahead masked off at once), and
    group 2 x 9 queries = two row blocks."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=64, metadata_dtype=torch.float32)
    kw = random_layer_storage(
        batch=2, kv_heads=1, group=2, num_queries=9, head_dim=64, config=cfg,
        n_tiles=[4, 1], sink_len=[64, 64], tail_len=[3, 60], capacity=5, dtype=torch.float16,
    )  # fmt: skip
    _check(kw, num_splits=num_splits, variant="words", meta_ahead=meta_ahead)


# Row blocks under 16 rows (m_block < 16): Triton pads the products, the softmax sees real rows.
SMALL_BLOCK_CASES = [
    # group, L, head_dim, tile, kb, vb, dtype, n_tiles, sink_len, tail_len, variant, m_block
    (4, 1, 64, 64, 4, 2, torch.bfloat16, [3, 0], [64, 7], [5, 63], "words", 4),  # one block of 4 rows
    (4, 1, 64, 64, 4, 2, torch.float16, [2, 1], [11, 64], [0, 9], "words", 2),  # two blocks of 2 rows
    (1, 1, 128, 32, 8, 8, torch.float16, [2, 1], [32, 0], [3, 31], "words", 8),  # 1 row (capped)
    (2, 3, 64, 128, 2, 4, torch.bfloat16, [1, 2], [128, 5], [9, 0], "words", 4),  # 6 rows: 4 + 2 (masked)
    (8, 1, 64, 64, 4, 2, torch.float16, [2, 2], [64, 64], [17, 0], "planes", 8),
    (4, 1, 64, 64, 2, 2, torch.bfloat16, [3, 1], [64, 3], [1, 60], "planes", 4),
]


@pytest.mark.parametrize("group,nq,d,g,kb,vb,dtype,nt,sl,tl,variant,m_block", SMALL_BLOCK_CASES)
def test_decode_tc_small_row_blocks_match_reference(
    group, nq, d, g, kb, vb, dtype, nt, sl, tl, variant, m_block
):
    """m_block < 16 (fewer padded query rows per program): both variants, several row blocks,
    a last block with masked rows, GQA 1/2/4/8, multi-query, odd lengths."""
    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=g)
    kw = random_layer_storage(
        batch=len(nt), kv_heads=2, group=group, num_queries=nq, head_dim=d, config=cfg,
        n_tiles=nt, sink_len=sl, tail_len=tl, capacity=max(nt) + 1, dtype=dtype,
    )  # fmt: skip
    _check(kw, num_splits=2, variant=variant, m_block=m_block)


def test_decode_tc_rejects_bad_m_block():
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=64)
    kw = random_layer_storage(
        batch=1, kv_heads=1, group=4, num_queries=1, head_dim=64, config=cfg,
        n_tiles=[1], sink_len=[64], tail_len=[0], dtype=torch.float16,
    )  # fmt: skip
    for bad in (3, 0, 128):
        with pytest.raises(ValueError, match="m_block="):
            decode_tc.quantized_decode_attention(**kw, m_block=bad)


def test_decode_tc_words_variant_rejects_small_planes_and_bad_options():
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32)
    kw = random_layer_storage(
        batch=1, kv_heads=1, group=2, num_queries=1, head_dim=64, config=cfg,
        n_tiles=[1], sink_len=[32], tail_len=[0], dtype=torch.float16,
    )  # fmt: skip
    with pytest.raises(ValueError, match="word planes of >= 16 tokens"):
        decode_tc.quantized_decode_attention(**kw, variant="words")
    with pytest.raises(ValueError, match="variant="):
        decode_tc.quantized_decode_attention(**kw, variant="bytes")
    with pytest.raises(ValueError, match="meta_ahead="):
        decode_tc.quantized_decode_attention(**kw, meta_ahead=3)
    with pytest.raises(ValueError, match="code_operands='offset'"):
        decode_tc.quantized_decode_attention(**kw, code_operands="offset")
    # this shape runs "planes" (key planes of 8 words): subnormal operands are words-only
    with pytest.raises(ValueError, match="variant='words' only"):
        decode_tc.quantized_decode_attention(**kw, code_operands="subnormal")
    with pytest.raises(ValueError, match="variant='words' only"):
        decode_tc.quantized_decode_attention(**kw, variant="planes", code_operands="subnormal")


@pytest.mark.parametrize("num_splits,prefetch", [(1, False), (3, True), (8, False), (8, True)])
def test_decode_tc_split_count_does_not_change_result(num_splits, prefetch):
    """More splits than tiles leaves empty splits; they must merge away cleanly. With prefetch the
    key codes come one tile ahead (the last look-ahead is masked off)."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float32)
    kw = random_layer_storage(
        batch=2, kv_heads=1, group=4, num_queries=1, head_dim=64, config=cfg,
        n_tiles=[5, 2], sink_len=[32, 32], tail_len=[3, 30], capacity=6, dtype=torch.float16,
    )  # fmt: skip
    _check(kw, num_splits=num_splits, prefetch=prefetch)


def test_decode_tc_multi_query_many_rows():
    """group 8 x 16 queries = 128 rows: four row blocks, causal among the 16 new tokens."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32)
    kw = random_layer_storage(
        batch=1, kv_heads=1, group=8, num_queries=16, head_dim=64, config=cfg,
        n_tiles=[2], sink_len=[32], tail_len=[13], capacity=3, dtype=torch.float16,
    )  # fmt: skip
    _check(kw, num_splits=2, prefetch=True)


def test_decode_tc_without_query_split_is_close():
    """qa_split=False (one float16 key operand): still close, within a looser bound."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32)
    kw = random_layer_storage(
        batch=1, kv_heads=2, group=4, num_queries=1, head_dim=64, config=cfg,
        n_tiles=[3], sink_len=[32], tail_len=[6], capacity=3, dtype=torch.float16,
    )  # fmt: skip
    out = decode_tc.quantized_decode_attention(**kw, num_splits=2, qa_split=False)
    assert relative_error(out, _reference(kw)) < 3e-3


def test_decode_tc_head_dim_256_fp16_metadata_and_capacity_views():
    """Head dim 256, float16 metadata, storage as non-contiguous views of a capacity buffer."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float16)
    kw = random_layer_storage(
        batch=2, kv_heads=1, group=2, num_queries=1, head_dim=256, config=cfg,
        n_tiles=[2, 1], sink_len=[32, 32], tail_len=[6, 0], capacity=4, dtype=torch.bfloat16,
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
        kw[name] = kw[name][:, :, :3]
        assert not kw[name].is_contiguous()
    _check(kw, num_splits=2)


def test_decode_tc_supports_and_rejects_bad_input():
    assert decode_tc.supports(128, 128, 4, 2, 1, torch.bfloat16) is None
    assert "float16/bfloat16" in decode_tc.supports(128, 128, 4, 2, 1, torch.float32)
    assert "key planes" in decode_tc.supports(128, 32, 2, 2, 1, torch.bfloat16)
    assert "value planes" in decode_tc.supports(32, 128, 4, 2, 1, torch.bfloat16)
    assert "queries" in decode_tc.supports(128, 128, 4, 2, 17, torch.bfloat16)
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32)
    kw = random_layer_storage(
        batch=1, kv_heads=2, group=2, num_queries=1, head_dim=64, config=cfg,
        n_tiles=[1], sink_len=[32], tail_len=[0], dtype=torch.float16,
    )  # fmt: skip
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_tc.quantized_decode_attention(**{**kw, "query": kw["query"][:, :3]})
    with pytest.raises(ValueError, match="decodes"):
        decode_tc.quantized_decode_attention(**{**kw, "key_bits": 3})
    with pytest.raises(ValueError, match="k_codes has shape"):
        decode_tc.quantized_decode_attention(**{**kw, "k_codes": kw["k_codes"][..., :8]})
    with pytest.raises(TypeError, match="n_tiles has dtype"):
        decode_tc.quantized_decode_attention(**{**kw, "n_tiles": kw["n_tiles"].long()})
    with pytest.raises(TypeError, match="sink_k has dtype"):
        decode_tc.quantized_decode_attention(**{**kw, "sink_k": kw["sink_k"].float()})


def test_dispatch_kernel_order(monkeypatch):
    """Only GPU-checked kernels run by default; the environment can force any kernel."""
    from kvarn.attention.triton import dispatch

    monkeypatch.delenv("KVARN_DECODE_KERNEL", raising=False)
    assert dispatch.decode_kernel_order() == dispatch.GPU_CHECKED_DECODE
    assert set(dispatch.GPU_CHECKED_DECODE) <= set(dispatch.DECODE_MODULES)
    for name in dispatch.DECODE_MODULES:
        monkeypatch.setenv("KVARN_DECODE_KERNEL", name)
        assert dispatch.decode_kernel_order() == (name,)
    monkeypatch.setenv("KVARN_DECODE_KERNEL", "v1")
    with pytest.raises(ValueError, match="KVARN_DECODE_KERNEL"):
        dispatch.decode_kernel_order()


@pytest.mark.parametrize("kb,vb,dtype", [(4, 2, torch.bfloat16), (2, 4, torch.float32)])
def test_decode_chunked_matches_reference_at_tc_precision(kb, vb, dtype):
    """decode_chunked.py (the fallback) vs the float64 twin, at the tc kernel's bound."""
    from kvarn.attention.triton import decode_chunked

    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=32)
    kw = random_layer_storage(
        batch=2, kv_heads=2, group=4, num_queries=2, head_dim=64, config=cfg,
        n_tiles=[3, 0], sink_len=[32, 5], tail_len=[7, 0], capacity=4, dtype=dtype,
    )  # fmt: skip
    out = decode_chunked.quantized_decode_attention(**kw, num_splits=2)
    ref = _reference(kw)
    floor = relative_error(ref.to(dtype), ref)
    assert relative_error(out, ref) < 3.0 * floor + 1e-4


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_plane_asm_constants_decode_every_byte(bits):
    """The PTX plane extraction (GPU only, so not run here) emulated bit for bit on its own
    constants: every byte value gives code j exactly for every plane j."""
    import re
    import struct

    import numpy as np

    for j in range(8 // bits):
        text = decode_tc._plane_asm_text(bits, j)
        mask = int(re.search(r"lop3\.b32 t0, t0, 0x([0-9A-F]{8})", text).group(1), 16) & 0xFFFF
        scale = int(re.search(r"mov\.b32 s, 0x([0-9A-F]{8})", text).group(1), 16) & 0xFFFF
        bias = int(re.search(r"mov\.b32 c, 0x([0-9A-F]{8})", text).group(1), 16) & 0xFFFF
        assert "0x4140" in text and "0x4342" in text  # bytes 0,1 and 2,3 into 16-bit lanes

        def f16(h: int) -> np.float16:
            return np.frombuffer(struct.pack("<H", h), dtype=np.float16)[0]

        for byte in range(256):
            lane = (byte & mask) | 0x6400  # lop3 (a & b) | c with the byte in a 16-bit lane
            value = np.float32(f16(lane)) * np.float32(f16(scale)) + np.float32(f16(bias))
            assert np.float16(value) == (byte >> (bits * j)) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_word_asm_constants_decode_every_word(bits):
    """The PTX word-field extraction (GPU only) emulated on its own constants for both 16-bit
    lanes of a register: every field j of every 16-bit word gives its code exactly."""
    import re
    import struct

    import numpy as np

    def f16(h: int) -> np.float16:
        return np.frombuffer(struct.pack("<H", h), dtype=np.float16)[0]

    words = np.arange(1 << 16, dtype=np.uint32)
    for j in range(16 // bits):
        text = decode_tc._word_asm_text(bits, j)
        mask = int(re.search(r"lop3\.b32 t, (?:t|\$1), 0x([0-9A-F]{8})", text).group(1), 16)
        scale = int(re.search(r"mov\.b32 s, 0x([0-9A-F]{8})", text).group(1), 16) & 0xFFFF
        bias = int(re.search(r"mov\.b32 c, 0x([0-9A-F]{8})", text).group(1), 16) & 0xFFFF
        shifted = "shr.b32 t, $1, 8;" in text
        # the word in the low lane, a different word (its bitwise complement) in the high lane
        reg = words | ((~words & 0xFFFF) << 16)
        if shifted:
            reg = reg >> 8
        lanes = (reg & mask) | 0x64006400
        for lane, word in ((lanes & 0xFFFF, words), (lanes >> 16, ~words & 0xFFFF)):
            halves = lane.astype(np.uint16).view(np.float16).astype(np.float32)
            got = halves * np.float32(f16(scale)) + np.float32(f16(bias))
            assert np.array_equal(got, (word >> (bits * j)) & ((1 << bits) - 1)), (bits, j)


@pytest.mark.parametrize(
    "batch,kv_heads,slots_per_sm,expected",
    [(1, 8, 3, 49), (8, 8, 3, 6), (2, 8, 3, 24), (32, 8, 3, 3), (1, 8, 2, 33)],
)
def test_default_split_count_fills_one_wave(monkeypatch, batch, kv_heads, slots_per_sm, expected):
    """The cost model on an H100-sized device (132 SMs): as many equal runs as fill the program
    slots once where the rows x heads leave room (e.g. 8 x 49 = 392 of 396), else few waves."""
    monkeypatch.setattr(decode_tc, "sm_count", lambda device: 132)
    splits = decode_tc.default_num_splits(batch, kv_heads, torch.device("cpu"), slots_per_sm)
    assert splits == expected
    if batch * kv_heads * 2 <= 132 * slots_per_sm:
        assert batch * kv_heads * splits <= 132 * slots_per_sm
    assert decode_tc.programs_per_sm(168, 4) == 3 and decode_tc.programs_per_sm(None, 4) == 2


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_subnormal_field_asm_gives_exact_scaled_codes(bits):
    """The PTX of code_operands="subnormal" (GPU only) emulated on its own text for both 16-bit
    lanes of a register: every field j of every 16-bit word becomes the float16 code * 2**(s-24)
    exactly, which ``subnormal_field_scale`` turns back into the code; value bytes widened to 16
    bits (fields of bits * c < 8) take the same text."""
    import re

    import numpy as np

    words = np.arange(1 << 16, dtype=np.uint32)
    for j in range(16 // bits):
        text = decode_tc.subnormal_field_asm_text(bits, bits * j)
        mask = int(re.search(r"and\.b32 \$0, (?:t|\$1), 0x([0-9A-F]{8})", text).group(1), 16)
        shift = re.search(r"shr\.b32 t, \$1, (\d+);", text)
        assert ("lop3" not in text) and ("fma" not in text)
        # the word in the low lane, a different word (its bitwise complement) in the high lane
        reg = words | ((~words & 0xFFFF) << 16)
        if shift:
            reg = reg >> int(shift.group(1))
        lanes = reg & mask
        scale = np.float64(decode_tc.subnormal_field_scale(bits, bits * j))
        for lane, word in ((lanes & 0xFFFF, words), (lanes >> 16, ~words & 0xFFFF)):
            assert not (lane & 0x7C00).any()  # exponent bits zero: subnormal (or zero)
            halves = lane.astype(np.uint16).view(np.float16).astype(np.float64)
            assert np.array_equal(halves * scale, (word >> (bits * j)) & ((1 << bits) - 1)), (bits, j)


def test_decode_tc_on_a_strided_batch():
    """Every other row of a larger storage: the per-row length vectors are strided too (the
    kernels read row b's length at offset b, so the wrapper makes them dense)."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32)
    kw = random_layer_storage(
        batch=4, kv_heads=2, group=4, num_queries=1, head_dim=64, config=cfg, n_tiles=[2, 3, 1, 2],
        sink_len=[32, 9, 0, 5], tail_len=[3, 0, 31, 1], capacity=4, dtype=torch.bfloat16, seed=22,
    )  # fmt: skip
    part = {k: (v[1::2] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    assert part["n_tiles"].stride(0) == 2
    _check(part)
