"""The PyTorch attention over packed tiles equals plain float64 attention over the dequantized
storage (codec.decode_tiles) plus the new tokens, for every layout the cache produces."""

from __future__ import annotations

import pytest
import torch

from kvarn.attention import quantized_attention_reference, quantized_decode_attention, unpack_codes_float
from kvarn.attention.unpack import code_planes, plane_count
from kvarn.codec import decode_tiles, encode_tiles
from kvarn.config import KVarNConfig
from kvarn.method.packing import pack_codes, unpack_codes
from tests.test_cache_common import (
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    plain_attention,
    random_kv,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_codes_float_matches_unpack_codes(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8, generator=g)
    packed = pack_codes(codes, bits)
    for dtype in (torch.float32, torch.float64):
        got = unpack_codes_float(packed, bits, dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got, unpack_codes(packed, bits).to(dtype), rtol=0, atol=0)


def test_unpack_codes_float_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes_float(torch.zeros(4), 4)
    with pytest.raises(ValueError, match="multiple of 3"):
        unpack_codes_float(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="not supported"):
        unpack_codes_float(torch.zeros(4, dtype=torch.uint8), 5)


def build_storage(batch, hkv, dim, quant, n_tiles, sink_len, tail_len, dtype, seed):
    """Random layer storage in the layerstore layout (capacity = max tiles + 1 spare slot)."""
    g = quant.tile_size
    gen = torch.Generator().manual_seed(seed)
    cap = max(n_tiles) + 1
    tiles_k = random_kv((batch, hkv, cap, g, dim), generator=gen)
    tiles_v = random_kv((batch, hkv, cap, g, dim), generator=gen)
    qt = encode_tiles(tiles_k, tiles_v, quant)
    storage = {
        "k_codes": qt.keys.codes,
        "k_scale": qt.keys.scale,
        "k_zero": qt.keys.zero,
        "k_token_scale": qt.keys.token_scale,
        "v_codes": qt.values.codes,
        "v_scale": qt.values.scale,
        "v_zero": qt.values.zero,
        "v_channel_scale": qt.values.channel_scale,
        "n_tiles": torch.tensor(n_tiles, dtype=torch.int32),
        "sink_k": random_kv((batch, hkv, g, dim), dtype, generator=gen),
        "sink_v": random_kv((batch, hkv, g, dim), dtype, generator=gen),
        "sink_len": torch.tensor(sink_len, dtype=torch.int32),
        "tail_k": random_kv((batch, hkv, g, dim), dtype, generator=gen),
        "tail_v": random_kv((batch, hkv, g, dim), dtype, generator=gen),
        "tail_len": torch.tensor(tail_len, dtype=torch.int32),
    }
    return storage, qt


def expected_attention(query, storage, qt, new_k, new_v, new_valid, scaling):
    """Row by row: plain float64 attention over [sink, decoded tiles, tail, real new tokens]."""
    batch, hq, length, dim = query.shape
    hkv = new_k.shape[1]
    dk, dv = decode_tiles(qt, dtype=torch.float64)  # [B, H, cap, G, D]
    out = torch.zeros(batch, hq, length, dim, dtype=torch.float64)
    for b in range(batch):
        n, s, t = int(storage["n_tiles"][b]), int(storage["sink_len"][b]), int(storage["tail_len"][b])
        valid = new_valid[b] if new_valid is not None else torch.ones(length, dtype=torch.bool)
        keys, values = (
            torch.cat(
                [
                    storage[f"sink_{kv}"][b, :, :s].double(),
                    decoded[b, :, :n].reshape(hkv, -1, dim),
                    storage[f"tail_{kv}"][b, :, :t].double(),
                    new[b][:, valid].double(),
                ],
                dim=1,
            )
            for kv, decoded, new in (("k", dk, new_k), ("v", dv, new_v))
        )
        history = keys.shape[1] - int(valid.sum())
        new_pos = torch.cumsum(valid.long(), 0) - 1  # index among the real new tokens
        allowed = torch.zeros(length, keys.shape[1], dtype=torch.bool)
        allowed[:, :history] = True
        real_idx = torch.nonzero(valid).flatten()
        for i in range(length):
            allowed[i, history + new_pos[real_idx[real_idx <= i]]] = True
        out[b] = plain_attention(query[b], keys, values, allowed, scaling)
    return out


# Relative to the largest output magnitude: in float32 the folded scores
# r * (sum (q a) code + sum q z) cancel large terms on outlier channels, so the rounding error
# scales with the data, not with each element. float64 shows the math itself is exact.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


CASES = [
    # batch, hq, hkv, dim, preset, tile, n_tiles, sink_len, tail_len, length, padded
    (2, 6, 2, 64, "k4v2", 32, [3, 1], [32, 32], [5, 31], 1, False),
    (3, 4, 1, 80, "k4v4", 32, [2, 0, 4], [32, 7, 32], [0, 0, 17], 7, True),
    (1, 4, 4, 96, "k2v2", 32, [5], [32], [3], 13, False),
    (2, 4, 2, 128, "k3v2", 32, [1, 2], [0, 0], [9, 1], 3, True),
    (1, 2, 1, 256, "k8v8", 32, [2], [32], [30], 2, False),
    (2, 6, 3, 64, "k4v2", 64, [2, 3], [64, 64], [63, 0], 11, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-D{c[3]}-L{c[9]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_plain_attention(case, dtype):
    batch, hq, hkv, dim, preset, tile, n_tiles, sink_len, tail_len, length, padded = case
    quant = KVarNConfig.from_preset(preset, tile_size=tile)
    storage, qt = build_storage(batch, hkv, dim, quant, n_tiles, sink_len, tail_len, dtype, seed=dim + length)
    gen = torch.Generator().manual_seed(7)
    query = random_kv((batch, hq, length, dim), dtype, outliers=False, generator=gen)
    new_k = random_kv((batch, hkv, length, dim), dtype, generator=gen)
    new_v = random_kv((batch, hkv, length, dim), dtype, generator=gen)
    new_valid = None
    if padded:
        new_valid = torch.ones(batch, length, dtype=torch.bool)
        new_valid[0, : length // 2] = False  # left padding of row 0
    scaling = dim**-0.5
    args = [storage[k] for k in ("k_codes", "k_scale", "k_zero", "k_token_scale")]
    args += [storage[k] for k in ("v_codes", "v_scale", "v_zero", "v_channel_scale", "n_tiles")]
    args += [storage[k] for k in ("sink_k", "sink_v", "sink_len", "tail_k", "tail_v", "tail_len")]
    # small chunks so that every loop (query blocks, key blocks, tile chunks) runs several times
    got = quantized_attention_reference(
        query,
        *args,
        new_k,
        new_v,
        quant.key_bits,
        quant.value_bits,
        scaling,
        new_valid=new_valid,
        chunk_tokens=tile,
        query_chunk=3,
        key_chunk=4,
    )
    assert got.dtype == dtype and got.shape == query.shape
    want = expected_attention(query, storage, qt, new_k, new_v, new_valid, scaling)
    rows = torch.ones(batch, length, dtype=torch.bool) if new_valid is None else new_valid
    for b in range(batch):
        assert_close_scaled(got[b][:, rows[b]], want[b][:, rows[b]], dtype)
    assert torch.isfinite(got).all()  # padding queries give finite (ignored) outputs

    if new_valid is None:
        seam = quantized_decode_attention(
            query, *args, new_k, new_v, quant.key_bits, quant.value_bits, scaling
        )
        assert_close_scaled(seam, want, dtype)


def test_reference_chunking_does_not_change_result():
    quant = KVarNConfig.from_preset("k4v2", tile_size=32)
    storage, _ = build_storage(1, 2, 64, quant, [9], [32], [11], torch.float32, seed=3)
    gen = torch.Generator().manual_seed(1)
    query = random_kv((1, 4, 21, 64), outliers=False, generator=gen)
    new_k, new_v = random_kv((1, 2, 21, 64), generator=gen), random_kv((1, 2, 21, 64), generator=gen)
    args = [storage[k] for k in storage]
    one_shot = quantized_attention_reference(query, *args, new_k, new_v, 4, 2, 0.125)
    chunked = quantized_attention_reference(
        query, *args, new_k, new_v, 4, 2, 0.125, chunk_tokens=32, query_chunk=5, key_chunk=2
    )
    # float32 rounding only (outputs reach ~100 here: outlier channels)
    torch.testing.assert_close(one_shot, chunked, rtol=1e-5, atol=1e-5 * float(one_shot.abs().max()))


def test_reference_ignores_garbage_beyond_valid_counts():
    """Slots past n_tiles / sink_len / tail_len may hold anything finite: the result must not move."""
    quant = KVarNConfig.from_preset("k4v2", tile_size=32)
    storage, _ = build_storage(2, 2, 64, quant, [1, 2], [32, 32], [4, 6], torch.float32, seed=5)
    query = torch.randn(2, 4, 1, 64)
    new = torch.randn(2, 2, 1, 64)
    keys = list(storage)

    def run(st):
        return quantized_attention_reference(query, *[st[k] for k in keys], new, new, 4, 2, 0.125)

    base = run(storage)
    dirty = {k: v.clone() for k, v in storage.items()}
    dirty["k_codes"][0, :, 1:] = 255
    dirty["k_scale"][0, :, 1:] = 1e4
    dirty["v_zero"][0, :, 1:] = -1e4
    dirty["tail_k"][:, :, 10:] = 1e3
    dirty["tail_v"][:, :, 10:] = 1e3
    torch.testing.assert_close(run(dirty), base)


def test_reference_rejects_head_mismatch():
    quant = KVarNConfig.from_preset("k4v2", tile_size=32)
    storage, _ = build_storage(1, 2, 64, quant, [1], [32], [0], torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        quantized_attention_reference(
            torch.randn(1, 3, 1, 64),
            *storage.values(),
            torch.randn(1, 2, 1, 64),
            torch.randn(1, 2, 1, 64),
            4,
            2,
            1.0,
        )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("packed_len", [8, 20, 18])
def test_code_planes_are_a_permutation_of_the_codes(bits, packed_len):
    if bits == 3 and packed_len % 3:
        pytest.skip("3-bit rows are whole 3-byte groups")
    g = torch.Generator().manual_seed(bits * packed_len)
    packed = torch.randint(0, 256, (2, 3, 5, packed_len), dtype=torch.uint8, generator=g)
    natural = unpack_codes(packed, bits).double()  # [2, 3, 5, n]
    planes = code_planes(packed[:, 1:], bits, torch.float64)  # a non-contiguous slice too
    k = plane_count(bits, packed_len)
    assert planes.shape == (2, 2, k, 5, natural.shape[-1] // k)
    # natural index i * k + j sits at plane j, position i
    again = planes.permute(0, 1, 3, 4, 2).reshape(2, 2, 5, -1)
    torch.testing.assert_close(again, natural[:, 1:], rtol=0, atol=0)
