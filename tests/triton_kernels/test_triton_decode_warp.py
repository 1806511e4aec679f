"""One-warp Gluon decode attention kernel (decode_warp.py) vs the float64 twin, under Triton's interpreter.

The module binds ``gl`` to ``gluon_interp`` under ``TRITON_INTERPRET=1``, so the interpreter runs
the kernel's own source on CPU (layouts dropped, shared memory a tensor per slot, ``mma_v2`` a
float32 ``tl.dot``). Seeds are fixed per case (the failures reproduce); every storage carries
outlier key channels and loud value tokens and NaN in the slots past each row's valid length.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
pytest.importorskip("triton", reason="triton is not installed (optional dependency)")

from kvarn.attention.triton.copy_policy import graph_step_copies, graph_step_copies_active  # noqa: E402
from kvarn.attention.triton.reference import quantized_decode_attention_reference  # noqa: E402
from kvarn.attention.triton.testing import random_layer_storage, relative_error  # noqa: E402
from kvarn.config import KVarNConfig  # noqa: E402

decode_warp = pytest.importorskip("kvarn.attention.triton.decode_warp")
decode_tc = pytest.importorskip("kvarn.attention.triton.decode_tc")

bf16, f16 = torch.bfloat16, torch.float16


def _storage(
    group, nq, d, g, kb, vb, dtype, nt, sl, tl, *, kv_heads=2, seed=0, md=torch.bfloat16, capacity=None
):
    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=g, metadata_dtype=md)
    return random_layer_storage(
        batch=len(nt), kv_heads=kv_heads, group=group, num_queries=nq, head_dim=d, config=cfg,
        n_tiles=nt, sink_len=sl, tail_len=tl, capacity=capacity or max(nt) + 1, dtype=dtype, seed=seed,
    )  # fmt: skip


def _reference(kw):
    return quantized_decode_attention_reference(
        **{**kw, "query": kw["query"].double()}, compute_dtype=torch.float64
    )


def _floor(ref, dtype) -> float:
    """The output dtype's own rounding of the float64 result (relative error)."""
    return relative_error(ref.to(dtype), ref)


def _check(kw, **launch):
    """Error within a few times the output dtype's own rounding of the float64 result (as
    test_triton_decode_tc.py): 3x for bf16 (the interpreter truncates float32 -> bf16 casts, and
    bf16 runs one float16 key / value operand by default), 2x for float16 (two operands each).
    A wrong tile, token, plane or row gives errors of order 1."""
    out = decode_warp.quantized_decode_attention(**kw, **launch)
    ref = _reference(kw)
    assert out.shape == kw["query"].shape and out.dtype == kw["query"].dtype
    err = relative_error(out, ref)
    floor = _floor(ref, out.dtype)
    factor = 3.0 if out.dtype == torch.bfloat16 else 2.0
    assert err < factor * floor + 1e-4, f"relative error {err} (output rounding alone {floor})"
    return out


# Shapes the kernel takes: tile_size * kb / 16 >= 16 (K8: G >= 32, K4: G >= 64, K2: G >= 128) and
# head_dim * vb / 16 >= 16 (V8: D >= 32, V4: D >= 64, V2: D >= 128).
CASES = [
    # group, L, head_dim, tile, kb, vb, dtype, n_tiles, sink_len, tail_len, launch
    # GQA 1; a row with no tiles; a full tail (tile_size - 1); K4V2 (the benchmark format)
    (1, 1, 128, 64, 4, 2, bf16, [3, 0], [64, 7], [5, 63], {"num_splits": 2}),
    # K2V2; an empty sink; both rows end exactly on a tile boundary or one short of the next
    (4, 1, 128, 128, 2, 2, f16, [2, 1], [128, 0], [0, 127], {"num_splits": 1}),
    # GQA 8 (8 rows: one full block); head_dim 64 with 4-bit values; 8-bit keys; three stages
    (8, 1, 64, 32, 8, 4, bf16, [2, 2], [32, 32], [17, 0], {"stages": 3}),
    # group 4 x 3 queries = 12 rows: two row blocks of 8 (the second half masked); default launch
    (4, 3, 128, 64, 4, 4, f16, [1, 3], [11, 64], [1, 9], {}),
    # group 4 x 4 queries = 16 rows in one block of 16
    (4, 4, 128, 64, 4, 2, bf16, [2, 1], [64, 3], [9, 0], {"rows_per_program": 16}),
    # head_dim 256, K8V8, one stage (no tile in flight ahead)
    (2, 2, 256, 32, 8, 8, bf16, [2, 1], [32, 32], [0, 4], {"stages": 1}),
    # head_dim 64 with 8-bit values, 2-bit keys; more splits than the longest row's tiles
    (1, 2, 64, 128, 2, 8, f16, [2, 0], [0, 128], [127, 5], {"num_splits": 3}),
    # 6 rows in a block of 16 (10 masked rows), head_dim 256, float16 with one stage
    (2, 3, 256, 64, 4, 2, f16, [1, 2], [64, 1], [63, 0], {"rows_per_program": 16, "stages": 1}),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_decode_warp_matches_reference(i):
    """GQA 1/2/4/8; 1..4 queries (1, 2 and 3 row blocks' worth of rows, blocks of 8 and 16 with
    masked rows); head_dim 64/128/256; keys K2/K4/K8, values V2/V4/V8; bf16 and float16; odd per-row
    lengths, rows with no tiles, empty sinks, full tails, exact tile boundaries; 1..3 stages."""
    group, nq, d, g, kb, vb, dtype, nt, sl, tl, launch = CASES[i]
    assert decode_warp.supports(d, g, kb, vb, nq, dtype) is None
    _check(_storage(group, nq, d, g, kb, vb, dtype, nt, sl, tl, seed=100 + i), **launch)


@pytest.mark.parametrize("num_splits,stages", [(1, 1), (1, 3), (8, 2), (3, 3), (2, 4)])
def test_decode_warp_split_count_and_stages_do_not_change_result(num_splits, stages):
    """Every split count and pipeline depth gives the reference's result: one split over 5 tiles
    (stages 1 and 3: the ring of stage buffers wraps), more splits than tiles (empty splits merge
    away; 3 stages over runs of one tile mask the look-ahead off at once), 4 stages."""
    kw = _storage(4, 1, 128, 64, 4, 2, f16, [5, 1], [64, 64], [3, 60], seed=7, md=torch.float32)
    _check(kw, num_splits=num_splits, stages=stages)


def test_decode_warp_many_row_blocks():
    """group 8 x 4 queries = 32 rows: four row blocks of 8 (and two of 16) give the same result
    as the reference; the causal mask among the new tokens holds in every block."""
    kw = _storage(8, 4, 128, 64, 4, 2, f16, [2], [64], [13], kv_heads=1, seed=11)
    a = _check(kw, num_splits=2)
    b = _check(kw, num_splits=2, rows_per_program=16)
    assert relative_error(a, b) < 2 * _floor(_reference(kw), f16)


@pytest.mark.parametrize("dtype", [f16, bf16])
def test_decode_warp_agrees_with_decode_tc(dtype):
    """Same inputs, same split count: decode_warp and decode_tc differ by far less than the output
    rounding (measured 0.01-0.07x of it), and both meet the reference bound."""
    kw = _storage(4, 2, 128, 64, 4, 2, dtype, [3, 1], [64, 5], [7, 63], seed=3)
    ref = _reference(kw)
    floor = _floor(ref, dtype)
    warp = _check(kw, num_splits=2)
    tc = decode_tc.quantized_decode_attention(**kw, num_splits=2)
    assert relative_error(tc, ref) < 3.0 * floor + 1e-4
    assert relative_error(warp, tc) < 0.5 * floor, (relative_error(warp, tc), floor)


def test_decode_warp_float16_operand_splits():
    """float16 queries default to the second operands (q * a_k and p * a_v remainders): without
    them the error roughly doubles past float16's bound (measured 2-3x the rounding), with them
    it is at the rounding; bf16 with the splits forced on also meets the bound."""
    kw = _storage(4, 1, 128, 64, 4, 2, f16, [3, 1], [64, 5], [7, 63], seed=5)
    ref = _reference(kw)
    floor = _floor(ref, f16)
    split = relative_error(decode_warp.quantized_decode_attention(**kw, num_splits=2), ref)
    plain = relative_error(
        decode_warp.quantized_decode_attention(**kw, num_splits=2, qa_split=False, pa_split=False), ref
    )
    assert split < 2.0 * floor + 1e-4
    assert split < plain < 6.0 * floor + 1e-4, (split, plain, floor)
    kwb = _storage(4, 1, 128, 64, 4, 2, bf16, [3, 1], [64, 5], [7, 63], seed=5)
    _check(kwb, num_splits=2, qa_split=True, pa_split=True)


def test_decode_warp_writes_into_out():
    """``out=`` receives the result (the same tensor is returned, no NaN of its poison left); a
    wrong-dtype or strided ``out`` is refused."""
    kw = _storage(4, 1, 128, 64, 4, 2, bf16, [2, 0], [64, 3], [5, 0], seed=9)
    fresh = _check(kw, num_splits=2)
    out = torch.full_like(kw["query"], float("nan"))
    got = decode_warp.quantized_decode_attention(**kw, num_splits=2, out=out)
    assert got is out
    assert torch.equal(out, fresh)
    with pytest.raises(TypeError, match="out has dtype"):
        decode_warp.quantized_decode_attention(**kw, out=torch.empty_like(kw["query"], dtype=torch.float16))
    strided = torch.empty(*kw["query"].shape[:-1], 2 * kw["query"].shape[-1], dtype=bf16)[..., ::2]
    with pytest.raises(ValueError, match="contiguous last dim"):
        decode_warp.quantized_decode_attention(**kw, out=strided)


def test_decode_warp_poisoned_workspace(monkeypatch):
    """Split-K workspace filled with NaN before the launch: every partial slot (the 16-bit
    programs' and the tile splits', empty ones included) is written, so none stays
    NaN and the output is finite and correct. 6 splits over rows of 4 and 0 tiles."""
    monkeypatch.setattr(decode_tc, "POISON_WORKSPACE", True)  # restored by monkeypatch
    seen = {}
    real = decode_warp.split_workspace

    def spy(*args):
        seen["poison"] = args[-1]
        seen["parts"] = real(*args)
        return seen["parts"]

    monkeypatch.setattr(decode_warp, "split_workspace", spy)
    kw = _storage(4, 3, 128, 64, 4, 2, f16, [4, 0], [64, 0], [63, 1], seed=13)
    out = _check(kw, num_splits=6, rows_per_program=8)
    assert seen["poison"] is True
    assert torch.isfinite(out).all()
    part_o, part_m, part_l = seen["parts"]
    nd = decode_warp.dense_programs(64, decode_warp.dense_chunk(128, 64))  # new tokens + sink + tail chunks
    assert nd == 5 and part_o.shape[:3] == (2 * 2, nd + 6, 12)
    for x in (part_o, part_m, part_l):
        assert not torch.isnan(x).any()
    assert torch.isneginf(part_m[2:, nd:]).all()  # batch row 1 (no tiles): every tile split empty
    assert (part_l[2:, nd:] == 0).all() and (part_o[2:, nd:] == 0).all()
    assert torch.isfinite(part_m[:, 0]).all()  # the new tokens' program: every row sees token 0
    assert torch.isneginf(part_m[2:, 1:3]).all()  # batch row 1 has no sink: both sink chunks empty


def test_decode_warp_supports():
    """None for the shapes it takes, else a reason naming the limit."""
    for args in [
        (128, 128, 4, 2, 1, bf16),
        (64, 32, 8, 4, 16, f16),
        (256, 256, 2, 2, 1, bf16),
        (32, 64, 4, 8, 3, f16),
        (128, 128, 2, 8, 4, f16),
    ]:
        assert decode_warp.supports(*args) is None, args
    reasons = {
        (64, 128, 4, 2, 1, bf16): "under 16 value words",
        (128, 32, 4, 2, 1, bf16): "key planes under 16 tokens",
        (128, 64, 2, 2, 1, bf16): "key planes under 16 tokens",
        (128, 128, 4, 2, 1, torch.float32): "float16/bfloat16",
        (128, 128, 3, 2, 1, bf16): "decodes",
        (128, 128, 4, 1, 1, bf16): "decodes",
        (96, 128, 4, 2, 1, bf16): "power of two",
        (512, 128, 4, 2, 1, bf16): "power of two",
        (128, 512, 4, 2, 1, bf16): "<= 256",
        (128, 128, 4, 2, 17, bf16): "queries",
        (128, 128, 4, 2, 0, bf16): "queries",
    }
    for args, phrase in reasons.items():
        reason = decode_warp.supports(*args)
        assert isinstance(reason, str) and phrase in reason, (args, reason)


def test_decode_warp_rejects_unsupported_shapes():
    """The wrapper refuses what ``supports`` refuses, with the reason in the message."""
    kw = _storage(2, 1, 64, 64, 4, 2, f16, [1], [64], [0], kv_heads=1)  # head_dim 64 at 2-bit values
    with pytest.raises(ValueError, match="one-warp decode kernel.*head_dim=64 at 2-bit values"):
        decode_warp.quantized_decode_attention(**kw)
    kw = _storage(2, 1, 128, 32, 4, 2, f16, [1], [32], [0], kv_heads=1)  # 8-token key planes
    with pytest.raises(ValueError, match="tile_size=32 at 4-bit keys"):
        decode_warp.quantized_decode_attention(**kw)
    kw = _storage(2, 1, 128, 64, 4, 2, torch.float32, [1], [64], [0], kv_heads=1)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        decode_warp.quantized_decode_attention(**kw)


def test_decode_warp_rejects_bad_launch_options():
    """rows_per_program other than 8 / 16, stages outside 1..4, num_splits outside 1..MAX_SPLITS,
    max_registers outside 24..255 and
    malformed storage raise errors naming the offending argument."""
    kw = _storage(2, 1, 128, 64, 4, 2, f16, [1], [64], [0], kv_heads=2)
    for bad in (12, 4, 32):
        with pytest.raises(ValueError, match="rows_per_program="):
            decode_warp.quantized_decode_attention(**kw, rows_per_program=bad)
    for bad in (5, -1):
        with pytest.raises(ValueError, match="stages="):
            decode_warp.quantized_decode_attention(**kw, stages=bad)
    for bad in (0, decode_warp.MAX_SPLITS + 1):
        with pytest.raises(ValueError, match="num_splits="):
            decode_warp.quantized_decode_attention(**kw, num_splits=bad)
    for bad in (0, 16, 256):
        with pytest.raises(ValueError, match="max_registers="):
            decode_warp.quantized_decode_attention(**kw, max_registers=bad)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_warp.quantized_decode_attention(**{**kw, "query": kw["query"][:, :3]})
    with pytest.raises(ValueError, match="k_codes has shape"):
        decode_warp.quantized_decode_attention(**{**kw, "k_codes": kw["k_codes"][..., :8]})
    with pytest.raises(TypeError, match="n_tiles has dtype"):
        decode_warp.quantized_decode_attention(**{**kw, "n_tiles": kw["n_tiles"].long()})


@pytest.mark.parametrize("option", ["stages", "rows_per_program"])
def test_decode_warp_rejects_zero_stages_and_rows(option):
    kw = _storage(2, 1, 128, 64, 4, 2, f16, [1], [64], [0], kv_heads=1)
    with pytest.raises(ValueError, match=f"{option}="):
        decode_warp.quantized_decode_attention(**kw, **{option: 0})


def test_decode_warp_merge_pdl_is_a_no_op_off_the_gpu():
    """``merge_pdl`` only changes how the merge is launched on CUDA (a programmatic dependent
    launch); on CPU / under the interpreter the option is accepted and the result is bit for bit
    the default's."""
    kw = _storage(4, 1, 128, 64, 4, 2, bf16, [3, 1], [64, 5], [7, 63], seed=21)
    assert torch.equal(
        decode_warp.quantized_decode_attention(**kw, num_splits=2, merge_pdl=True),
        decode_warp.quantized_decode_attention(**kw, num_splits=2),
    )


def test_decode_warp_default_splits_fill_one_wave_up_to_the_default_cap():
    """The default split count fills programs_per_sm x SMs for the call's (row, KV head, row block)
    runs and stops at DEFAULT_MAX_SPLITS (callers may ask for up to MAX_SPLITS)."""
    cpu = torch.device("cpu")  # sm_count() is 4 off the GPU
    assert decode_warp.default_num_splits(1, 2, 1, cpu, 8) == 16
    assert decode_warp.default_num_splits(8, 8, 2, cpu, 8) == 1
    assert decode_warp.default_num_splits(1, 1, 1, cpu, 10_000) == decode_warp.DEFAULT_MAX_SPLITS
    assert decode_warp.DEFAULT_MAX_SPLITS <= decode_warp.MAX_SPLITS


def test_decode_warp_max_registers_is_a_no_op_off_the_gpu():
    """``max_registers`` is a compiler option (maxnreg) for CUDA launches; under the interpreter it
    is validated and otherwise leaves the result bit for bit the default's."""
    kw = _storage(4, 1, 128, 64, 4, 2, f16, [2, 1], [64, 3], [5, 60], seed=23)
    assert torch.equal(
        decode_warp.quantized_decode_attention(**kw, num_splits=2, max_registers=168),
        decode_warp.quantized_decode_attention(**kw, num_splits=2),
    )


@pytest.mark.parametrize(
    "kb,vb,d,g,dtype",
    [
        (4, 2, 128, 128, bf16),
        (2, 4, 128, 128, f16),
        (8, 8, 128, 32, bf16),
        (4, 4, 64, 64, f16),
        (2, 2, 256, 128, bf16),
    ],
)
def test_decode_warp_coalesced_value_copy_is_bit_for_bit_the_default(kb, vb, d, g, dtype):
    """value_copy="coalesced" copies a tile's value rows in one cp.async whose rows are permuted
    (stage row f*KW + w <- token NPK*w + f) instead of one copy per key plane: the stage holds the
    same words, so the result is bit for bit the default's (K2/K4/K8 planes, V2/V4/V8 words, odd
    lengths, several tiles per split), and both match the reference."""
    kw = _storage(4, 2, d, g, kb, vb, dtype, [3, 1], [g, 5], [7, g - 1], seed=kb * 10 + vb)
    planes = _check(kw, num_splits=1)
    coalesced = decode_warp.quantized_decode_attention(**kw, num_splits=1, value_copy="coalesced")
    assert torch.equal(planes, coalesced)


@pytest.mark.parametrize(
    "kb,vb,d,g,dtype,stages,splits,n_tiles",
    [
        (4, 2, 128, 128, bf16, 2, 1, [4, 1]),  # 4 tiles in one split: prologue, 3 steps, epilogue
        (2, 4, 128, 128, f16, 3, 2, [5, 2]),  # 3 stages; splits of 3 and 2 tiles, one of 1 and 1
        (8, 8, 128, 32, bf16, 4, 1, [6, 3]),  # 4 stages: copies 3 tiles ahead, more than a split has
        (4, 4, 64, 64, f16, 2, 3, [1, 0]),  # one-tile and empty splits: no step, epilogue or none
        (2, 2, 256, 128, bf16, 2, 2, [3, 1]),
    ],
)
def test_decode_warp_pipeline_is_bit_for_bit_the_default(kb, vb, d, g, dtype, stages, splits, n_tiles):
    """pipeline=True reorders the copies (keys one tile further ahead than values) and computes a
    tile's scores one step before its softmax, but every tile goes through the same operations in
    the same order, so the result is bit for bit the default's, and both match the reference:
    several tiles per split, one tile, none, and more stages than a split has tiles."""
    kw = _storage(4, 2, d, g, kb, vb, dtype, n_tiles, [g, 5], [7, g - 1], seed=kb * 10 + vb + stages)
    default = _check(kw, num_splits=splits, stages=stages)
    pipelined = decode_warp.quantized_decode_attention(**kw, num_splits=splits, stages=stages, pipeline=True)
    assert torch.equal(default, pipelined)


@pytest.mark.parametrize(
    "kb,vb,d,g,dtype,splits,n_tiles,sink,tail",
    [
        (4, 2, 128, 128, bf16, 3, [4, 1], [128, 5], [7, 127]),
        (4, 4, 64, 64, f16, 1, [2, 0], [64, 0], [0, 63]),
        (8, 8, 128, 32, bf16, 4, [3, 2], [3, 32], [31, 1]),
    ],
)
def test_decode_warp_grid_order_does_not_change_the_result(kb, vb, d, g, dtype, splits, n_tiles, sink, tail):
    """dense_last (the default: tile splits first in the grid, the 16-bit programs after) against
    the session-5 order (dense_last=False): only which grid column runs which program changes;
    every program writes the same partial slot, so the results are equal bit for bit, and both
    match the reference."""
    kw = _storage(4, 2, d, g, kb, vb, dtype, n_tiles, sink, tail, seed=kb + vb + splits)
    default = _check(kw, num_splits=splits)
    assert torch.equal(default, _check(kw, num_splits=splits, dense_last=False))


def test_decode_warp_pipeline_needs_two_stages():
    kw = _storage(2, 1, 128, 64, 4, 2, f16, [1], [64], [0], kv_heads=1)
    with pytest.raises(ValueError, match="pipeline=True needs stages >= 2"):
        decode_warp.quantized_decode_attention(**kw, stages=1, pipeline=True)


def test_decode_warp_coalesced_value_copy_layout_is_a_permutation_of_the_stage():
    """The copy layout covers every element of the [G, VW] stage exactly once, each lane holding
    16-byte runs of a row, and the lanes of one register step read consecutive tokens."""
    for g, vw, npk in [(128, 16, 4), (128, 32, 8), (32, 64, 2), (256, 16, 4), (64, 16, 4)]:
        lay = decode_warp.coalesced_value_copy_layout(g, vw, npk)
        bases = lay.reg_bases + lay.lane_bases
        assert lay.reg_bases[:3] == [[0, 1], [0, 2], [0, 4]]
        seen = set()
        for code in range(1 << len(bases)):
            r = c = 0
            for bit, (br, bc) in enumerate(bases):
                if code >> bit & 1:
                    r ^= br
                    c ^= bc
            seen.add((r, c))
        assert len(seen) == g * vw and all(0 <= r < g and 0 <= c < vw for r, c in seen)
        kw = g // npk
        tokens = set()
        for lane in range(32):
            r = c = 0
            for bit, (br, bc) in enumerate(lay.lane_bases):
                if lane >> bit & 1:
                    r ^= br
                    c ^= bc
            tokens.add(npk * (r % kw) + r // kw)
        assert tokens == set(range(min(g, 32 * 8 // vw)))  # one instruction: consecutive tokens


def test_decode_warp_rejects_unknown_value_copy():
    kw = _storage(2, 1, 128, 64, 4, 2, f16, [1], [64], [0], kv_heads=1)
    with pytest.raises(ValueError, match="value_copy="):
        decode_warp.quantized_decode_attention(**kw, value_copy="rows")


@pytest.mark.parametrize(
    "kb,vb,d,g,dtype,md,stages,splits,n_tiles,capacity",
    [
        (4, 2, 128, 128, bf16, torch.bfloat16, 2, 1, [4, 1], None),  # the benchmark format
        (2, 4, 128, 128, f16, torch.float16, 3, 2, [5, 2], 7),  # spare capacity: tile stride > tiles
        (8, 8, 128, 64, bf16, torch.float32, 4, 1, [6, 3], None),  # float32 metadata, 4 stages
        (4, 2, 256, 128, f16, torch.bfloat16, 1, 3, [1, 0], 3),  # one stage; one-tile and empty splits
    ],
)
def test_decode_warp_tma_copy_is_bit_for_bit_the_default(
    kb, vb, d, g, dtype, md, stages, splits, n_tiles, capacity
):
    """copy="tma" moves each tile with descriptor boxes (key rows, value planes in one 3-D box,
    1-D metadata vectors) to the same stage contents as the per-lane cp.async path, so the result
    is bit for bit the default's: the coordinates of every (row, head, tile), through spare
    capacity and poisoned slots past each row's tiles (a wrong tile would bring NaN)."""
    kw = _storage(
        4, 1, d, g, kb, vb, dtype, n_tiles, [g, 3], [5, g - 1], md=md, capacity=capacity, seed=kb + vb
    )
    default = _check(kw, num_splits=splits, stages=stages)
    tma = decode_warp.quantized_decode_attention(**kw, num_splits=splits, stages=stages, copy="tma")
    assert torch.equal(default, tma)


def test_decode_warp_tma_copy_on_a_strided_batch():
    """Every other row of a larger storage (a batch stride of two rows, starting past the first
    row): the descriptors span the storage from the view's first element and find each tile of
    each row by coordinate."""
    kw = _storage(4, 1, 128, 128, 4, 2, bf16, [2, 3, 1, 2], [128, 9, 0, 5], [3, 0, 127, 1], seed=21)
    part = {k: (v[1::2] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    assert not part["k_codes"].is_contiguous() and part["k_codes"].data_ptr() != kw["k_codes"].data_ptr()
    default = _check(part, num_splits=2)
    assert torch.equal(default, decode_warp.quantized_decode_attention(**part, num_splits=2, copy="tma"))


def test_decode_warp_tma_copy_rejects_what_it_cannot_take():
    """Rows the swizzled stages cannot take (256-byte value rows: head_dim 256 at 8 bits), the
    software pipeline and the coalesced value copy are clear errors, as is an unknown copy."""
    kw = _storage(2, 1, 256, 64, 4, 8, bf16, [1, 1], [3, 3], [1, 1])
    with pytest.raises(ValueError, match="value rows of 256 bytes"):
        decode_warp.quantized_decode_attention(**kw, copy="tma")
    kw = _storage(2, 1, 128, 128, 4, 2, bf16, [1, 1], [3, 3], [1, 1])
    with pytest.raises(ValueError, match="neither pipeline"):
        decode_warp.quantized_decode_attention(**kw, copy="tma", pipeline=True)
    with pytest.raises(ValueError, match="neither pipeline"):
        decode_warp.quantized_decode_attention(**kw, copy="tma", value_copy="coalesced")
    with pytest.raises(ValueError, match="copy='bulk'"):
        decode_warp.quantized_decode_attention(**kw, copy="bulk")


def _kernel_storage(*args, **kwargs):
    """``_storage``'s tensors as the launch sees them (``kernel_layout``: what ``default_copy`` and
    ``tma_descriptors`` are given)."""
    kw = _storage(*args, **kwargs)
    _, storage = decode_warp.kernel_layout(kw["query"], {n: kw[n] for n in decode_warp.STORAGE})
    return storage


def test_decode_warp_default_copy_takes_tma_only_where_it_applies(monkeypatch):
    """copy=None picks TMA in graph steps (``graph_step_copies``) on a GPU of compute capability 9.0+ for
    storage the descriptors take, and the per-lane cp.async path everywhere else: eager calls,
    older GPUs, the software pipeline, the coalesced value copy, rows or vectors TMA cannot
    take, the interpreter and the CPU. The choice is made on the host, so a CUDA device of each capability is
    simulated (no GPU is touched: the descriptors are host objects)."""
    cuda = torch.device("cuda")
    storage = _kernel_storage(2, 1, 128, 128, 4, 2, bf16, [2, 1], [3, 3], [1, 1])
    args = (storage, 128, 128, 4, 2)
    assert decode_warp.default_copy(*args, torch.device("cpu"), False, "planes")[0] == "cp.async"
    assert decode_warp.default_copy(*args, cuda, False, "planes")[0] == "cp.async"  # interpreting
    monkeypatch.setattr(decode_warp, "interpreting", lambda: False)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    # eager calls: cp.async (TMA's per-launch host cost), whatever the GPU
    assert decode_warp.default_copy(*args, cuda, False, "planes") == ("cp.async", None, None)
    with graph_step_copies():  # a decode step being warmed up and recorded as a CUDA graph
        _default_copy_in_graph_steps(args, cuda, capability)
    assert not graph_step_copies_active()
    assert decode_warp.default_copy(*args, cuda, False, "planes") == ("cp.async", None, None)


def _default_copy_in_graph_steps(args, cuda, capability):
    """default_copy's choices inside graph_step_copies(), on a simulated sm_90 then sm_80."""
    copy, descs, layouts = decode_warp.default_copy(*args, cuda, False, "planes")
    assert copy == "tma" and len(descs) == 8 and len(layouts) == 5
    assert [d.block_shape for d in descs[:2]] == [[128, 32], [4, 32, 16]]  # key rows, value planes
    assert decode_warp.default_copy(*args, cuda, True, "planes")[0] == "cp.async"
    assert decode_warp.default_copy(*args, cuda, False, "coalesced")[0] == "cp.async"
    wide = _kernel_storage(2, 1, 256, 64, 4, 8, bf16, [1, 1], [3, 3], [1, 1])
    assert decode_warp.default_copy(wide, 256, 64, 4, 8, cuda, False, "planes") == ("cp.async", None, None)
    # 32-token tiles: bfloat16 token vectors of 64 bytes are not whole 128-byte TMA boxes, float32
    # ones (128 bytes) are
    short = _kernel_storage(2, 1, 128, 32, 8, 8, bf16, [2, 1], [3, 3], [1, 1])
    assert decode_warp.default_copy(short, 128, 32, 8, 8, cuda, False, "planes")[0] == "cp.async"
    with pytest.raises(ValueError, match="k_token_scale vectors of 64 bytes"):
        decode_warp.tma_descriptors(short, 128, 32, 8, 8)
    short = _kernel_storage(2, 1, 128, 32, 8, 8, bf16, [2, 1], [3, 3], [1, 1], md=torch.float32)
    assert decode_warp.default_copy(short, 128, 32, 8, 8, cuda, False, "planes")[0] == "tma"
    capability[0] = (8, 0)
    assert decode_warp.default_copy(*args, cuda, False, "planes") == ("cp.async", None, None)


@pytest.mark.parametrize(
    "group,nq,d,g,kb,vb,dtype,splits,launch",
    [
        (4, 1, 128, 128, 4, 2, bf16, 2, {}),  # the benchmark format: 2 plane pairs
        (2, 2, 128, 128, 2, 4, f16, 1, {"stages": 3}),  # K2: 4 pairs; float16 second operands
        (1, 3, 128, 64, 8, 8, bf16, 3, {"copy": "tma"}),  # K8: 1 pair; 3 of 4 rows; TMA copies
        (4, 1, 256, 128, 4, 2, f16, 2, {"value_copy": "coalesced"}),  # head_dim 256, one-copy values
    ],
)
def test_decode_warp_column_halves_match_the_default(group, nq, d, g, kb, vb, dtype, splits, launch):
    """column_halves=True pairs the key planes in the two halves of the MMA columns (two softmax
    streams per query, merged at the end of each split): the reference's result within the
    usual bound, and the default launch's to float32 accumulation (the two differ only in the
    order of the sums), on outliers, odd lengths, an empty row and a full tail."""
    kw = _storage(group, nq, d, g, kb, vb, dtype, [5, 0, 3], [g, 9, 0], [g - 1, 3, 0], seed=kb * 7 + vb)
    halves = _check(kw, num_splits=splits, column_halves=True, **launch)
    default = decode_warp.quantized_decode_attention(**kw, num_splits=splits, **launch)
    assert relative_error(halves.double(), default.double()) < 2 * _floor(_reference(kw), dtype) + 1e-4


def test_decode_warp_column_halves_rejects_what_it_cannot_take():
    """More than 4 query rows per KV head, 16-row programs and the pipeline are clear errors."""
    kw = _storage(4, 2, 128, 128, 4, 2, bf16, [1, 1], [3, 3], [1, 1])
    with pytest.raises(ValueError, match="at most 4 query rows per KV head \\(got 8"):
        decode_warp.quantized_decode_attention(**kw, column_halves=True)
    kw = _storage(4, 1, 128, 128, 4, 2, bf16, [1, 1], [3, 3], [1, 1])
    with pytest.raises(ValueError, match="at most 4 query rows"):
        decode_warp.quantized_decode_attention(**kw, column_halves=True, rows_per_program=16)
    with pytest.raises(ValueError, match="no pipeline"):
        decode_warp.quantized_decode_attention(**kw, column_halves=True, pipeline=True)
