"""Property tests (hypothesis) of the method's building blocks."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn.codec import encode_tiles
from kvarn.config import KVarNConfig
from kvarn.method.hadamard import hadamard_blocks, hadamard_matrix, hadamard_transform
from kvarn.method.normalize import imbalance, variance_normalize
from kvarn.method.packing import pack_codes, unpack_codes
from kvarn.method.rtn import dequantize_rows, quantize_rows
from tests.helpers_data import outlier_tiles

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(dim=st.sampled_from([8, 16, 32, 64, 80, 96, 112, 128, 160, 192, 256]), seed=st.integers(0, 2**31 - 1))
def test_rotation_is_orthonormal_and_self_inverse(dim, seed):
    h = hadamard_matrix(dim, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(dim, dtype=torch.float64))
    torch.testing.assert_close(h, h.T)
    assert sum(hadamard_blocks(dim)) == dim
    x = torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(hadamard_transform(y), x)
    torch.testing.assert_close(y, x @ h.T)


def test_power_of_two_rotation_is_sylvester():
    h = hadamard_matrix(4, torch.float64) * 2
    sylvester = torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )
    torch.testing.assert_close(h, sylvester)


@SETTINGS
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    groups=st.integers(0, 9),
    lead=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_is_exact(bits, groups, lead, seed):
    n = 8 * groups
    codes = torch.randint(0, 2**bits, (lead, 2, n), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )
    packed = pack_codes(codes, bits)
    assert packed.shape[-1] == n * bits // 8 and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_packing_layout_is_little_end_first():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack_codes(torch.tensor([[5, 10]], dtype=torch.uint8), 4).tolist() == [[5 | 10 << 4]]
    three = torch.arange(8, dtype=torch.uint8).unsqueeze(0)
    word = sum(i << (3 * i) for i in range(8))
    assert pack_codes(three, 3).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 6),
    method=st.sampled_from(["kvarn", "kivi", "varn_norot"]),
)
def test_tiles_in_a_batch_are_independent(seed, n, method):
    cfg = KVarNConfig(tile_size=32, method=method)
    k = outlier_tiles(n, 32, 64, seed=seed)
    v = outlier_tiles(n, 32, 64, seed=seed + 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a = encode_tiles(k, v, cfg)
    b = encode_tiles(k[perm], v[perm], cfg)
    for x, y in ((a.keys, b.keys), (a.values, b.values)):
        for name in ("codes", "scale", "zero"):
            assert torch.equal(getattr(x, name)[perm], getattr(y, name))


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    iters=st.integers(0, 12),
    r=st.sampled_from([32, 64, 128]),
    c=st.sampled_from([32, 64, 128]),
)
def test_chosen_imbalance_never_worse_than_identity(seed, iters, r, c):
    x = outlier_tiles(3, r, c, seed=seed)
    s_row, s_col = variance_normalize(x, iters)
    chosen = imbalance(x / s_col.unsqueeze(-2) / s_row.unsqueeze(-1))
    assert (chosen <= imbalance(x) * (1 + 1e-5)).all()
    log_row, log_col = s_row.log(), s_col.log()
    assert (log_row >= -0.3 - 1e-6).all() and (log_row <= 10 + 1e-5).all()
    assert (log_col >= -0.3 - 1e-6).all() and (log_col <= 10 + 1e-5).all()


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 3, 4, 8]))
def test_rtn_error_is_within_one_step(seed, bits):
    b = outlier_tiles(2, 64, 96, seed=seed)
    codes, lo, step = quantize_rows(b, bits)
    err = (dequantize_rows(codes, lo, step) - b).abs()
    # half a step from rounding, plus float32 slack; never more than one step
    assert (err <= step.unsqueeze(-1) * 0.5 + 1e-5 * b.abs().amax(-1, keepdim=True)).all()
    assert int(codes.max()) <= 2**bits - 1
