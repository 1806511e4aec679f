"""Fused tile compression kernels (v1, v3) vs the codec (kvarn.codec.encode_tiles), under Triton's interpreter.

v3 is a Gluon kernel; here it runs through ``kvarn.attention.triton.gluon_interp`` (same source,
layouts dropped), so these tests check its arithmetic, indexing and packing, not its layouts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
pytest.importorskip("triton", reason="triton is not installed (optional dependency)")

from kvarn.codec import QuantizedTiles, decode_tiles, encode_tiles  # noqa: E402
from kvarn.config import KVarNConfig  # noqa: E402
from kvarn.method.hadamard import hadamard_transform  # noqa: E402

compress = pytest.importorskip("kvarn.attention.triton.compress")
KERNELS = ["v1", "v3"]
# log2 of a zero variance is -inf by design (the clamps take over); numpy says so in the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


def _outlier_tiles(shape, dtype, gen):
    x = torch.randn(*shape, generator=gen)
    d = shape[-1]
    ch = torch.randperm(d, generator=gen)[:2]
    x[..., ch] = x[..., ch] * 30.0 + 5.0  # outlier channels with offsets, as keys have
    tok = torch.randperm(shape[-2], generator=gen)[:1]
    x[..., tok, :] *= 15.0  # a loud token
    return x.to(dtype)


def _pre_round_keys(x, ref):
    """(x / r - z) / a per key element [.., D, G] in float64: the value the reference rounded."""
    xt = x.double().transpose(-1, -2)
    k = ref.keys
    return (
        xt / k.token_scale.double().unsqueeze(-2) - k.zero.double().unsqueeze(-1)
    ) / k.scale.double().unsqueeze(-1)


def _pre_round_values(x, ref):
    v = ref.values
    return (
        x.double() / v.channel_scale.double().unsqueeze(-2) - v.zero.double().unsqueeze(-1)
    ) / v.scale.double().unsqueeze(-1)


def _assert_codes_match(got, want, bits, pre_round, label):
    """Identical codes except at rounding ties: a mismatch must be off by one, at a value within
    float32 noise of a .5 boundary, and rare."""
    from kvarn.method.packing import unpack_codes

    a, b = unpack_codes(got, bits).int(), unpack_codes(want, bits).int()
    diff = a != b
    if not diff.any():
        return
    assert (a - b).abs().max() == 1, f"{label}: codes differ by more than one step"
    frac = pre_round[diff] - pre_round[diff].floor()
    assert ((frac - 0.5).abs() < 1e-3).all(), f"{label}: codes differ away from a rounding tie: {frac}"
    assert diff.float().mean() < 1e-3, f"{label}: too many tie flips ({int(diff.sum())})"


def _assert_metadata_close(got, want, md, label):
    for name in ("scale", "zero", "token_scale", "channel_scale"):
        if not hasattr(got, name):
            continue
        x, y = getattr(got, name).double(), getattr(want, name).double()
        assert getattr(got, name).dtype == md
        # float32 noise of the iterated normalization, then at most one ulp of the metadata dtype
        tol = 2e-5 if md == torch.float32 else 2.0**-7
        err = ((x - y).abs() / y.abs().clamp_min(1e-6)).max().item()
        assert err <= tol, f"{label}.{name}: relative difference {err}"


def _assert_matches_codec(got, k, v, cfg):
    kb, vb, md = cfg.key_bits, cfg.value_bits, cfg.metadata_dtype
    want = encode_tiles(k, v, cfg)
    assert got.keys.codes.shape == want.keys.codes.shape and got.values.codes.shape == want.values.codes.shape
    assert got.keys.bits == kb and got.values.bits == vb
    ref32 = encode_tiles(k, v, cfg.replace(metadata_dtype=torch.float32))
    _assert_codes_match(got.keys.codes, want.keys.codes, kb, _pre_round_keys(k, ref32), "keys")
    _assert_codes_match(got.values.codes, want.values.codes, vb, _pre_round_values(v, ref32), "values")
    _assert_metadata_close(got.keys, want.keys, md, "keys")
    _assert_metadata_close(got.values, want.values, md, "values")
    # and the codec decodes its metadata to what it decodes its own to. With 16-bit metadata one
    # ulp of z moves a whole row, and Triton's interpreter truncates float32 -> bfloat16 casts
    # where GPUs and torch round (kivi tiles then differ by up to ~5% in norm, codes and metadata
    # checks above passing), so the reconstruction is compared for float32 metadata only. Both
    # sides decode the codec's codes: the codes were compared above, and a rounding-tie flip
    # (allowed there) moves one element a whole step, ~2e-4 of a 5-tile K4 norm on its own.
    if md == torch.float32:
        same_codes = QuantizedTiles(
            dataclasses.replace(got.keys, codes=want.keys.codes),
            dataclasses.replace(got.values, codes=want.values.codes),
        )
        kg, vg = decode_tiles(same_codes)
        kw, vw = decode_tiles(want)
        assert ((kg - kw).norm() / kw.norm()).item() < 1e-4
        assert ((vg - vw).norm() / vw.norm()).item() < 1e-4


CASES = [
    # method, key_bits, value_bits, tile_size, head_dim, dtype, metadata dtype
    ("kvarn", 4, 2, 32, 64, torch.float32, torch.float32),
    ("kvarn", 2, 4, 32, 64, torch.bfloat16, torch.float32),
    ("kvarn", 3, 8, 64, 32, torch.float16, torch.float32),
    ("kvarn", 4, 2, 32, 64, torch.bfloat16, torch.bfloat16),
    ("varn_norot", 2, 2, 32, 128, torch.float32, torch.float16),
    ("kivi", 4, 4, 64, 64, torch.bfloat16, torch.bfloat16),
    ("hadamard_rtn", 8, 3, 32, 64, torch.float32, torch.float32),
    ("kvarn", 2, 3, 32, 16, torch.bfloat16, torch.float32),  # smallest head_dim: 2 lanes per token
]


KERNEL_CASES = [(kernel, *case) for case in CASES for kernel in KERNELS]


@pytest.mark.parametrize("kernel,method,kb,vb,g,d,dtype,md", KERNEL_CASES)
def test_compress_matches_codec(kernel, method, kb, vb, g, d, dtype, md):
    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=g, method=method, metadata_dtype=md)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    # leading dims kept; v3 costs the interpreter ~0.7 s per program, so they get one pair
    pairs = 2 if kernel == "v1" else 1
    k = _outlier_tiles((1, pairs, g, d), dtype, gen)
    v = _outlier_tiles((1, pairs, g, d), dtype, gen)
    _assert_matches_codec(compress.compress_tiles(k, v, cfg, kernel=kernel), k, v, cfg)


@pytest.mark.parametrize(
    "kernel,opts", [("v1", {}), ("v3", {}), ("v3", {"fold": True, "tree": True, "half_tile": True})]
)
def test_compress_full_size_tile(kernel, opts):
    """The benchmark's shape, one pair: G = D = 128, bf16, K4V2 (4 warps, 8 tokens x 16 channels
    per thread in v3), also with v3's code variants."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=128, metadata_dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = _outlier_tiles((1, 128, 128), torch.bfloat16, gen)
    v = _outlier_tiles((1, 128, 128), torch.bfloat16, gen)
    _assert_matches_codec(compress.compress_tiles(k, v, cfg, kernel=kernel, **opts), k, v, cfg)


@pytest.mark.parametrize("kernel", KERNELS)
def test_compress_strided_views(kernel):
    """Tiles that are views into larger buffers (padded channels, a window of tokens): the kernels
    read through the strides."""
    cfg = KVarNConfig(key_bits=4, value_bits=4, tile_size=32, metadata_dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = _outlier_tiles((1, 40, 80), torch.float16, gen)[:, 5:37, 8:72]  # token stride 80, offset rows
    v = _outlier_tiles((1, 32, 64), torch.float16, gen)
    assert not k.is_contiguous()
    _assert_matches_codec(compress.compress_tiles(k, v, cfg, kernel=kernel), k, v, cfg)


@pytest.mark.parametrize("kernel", KERNELS)
def test_compress_large_offsets_stay_exact(kernel):
    """Every token and channel 1000x further from zero than its spread: v3 computes each std
    from one-pass moments of x * s - K, and the shift K (near the row's mean) keeps them from
    cancelling (without it the first state's scales are off by ~1e-2 and codes move).

    One iteration, because more let exact ties in: with such offsets later states differ from
    earlier ones by a factor common to all scales of an axis (clip at -0.3 binding), which leaves
    every imbalance ratio unchanged, so rounding alone picks the state (in the codec too)."""
    cfg = KVarNConfig(key_bits=4, value_bits=4, tile_size=32, metadata_dtype=torch.float32, iterations=1)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))

    def tiles():
        x = (
            torch.randn(2, 32, 64, generator=gen)
            * torch.logspace(-1, 1, 64)[torch.randperm(64, generator=gen)]
        )
        x[:, 3] *= 6.0  # a loud token
        return x + 1000.0

    k, v = tiles(), tiles()
    _assert_matches_codec(compress.compress_tiles(k, v, cfg, kernel=kernel), k, v, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compress_with_rotation_matches_rotate_then_codec(dtype):
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = _outlier_tiles((3, 32, 64), dtype, gen)
    v = _outlier_tiles((3, 32, 64), dtype, gen)
    got = compress.compress_tiles(k, v, cfg, rotate=True, kernel="v3")  # rotation always runs v1
    kr, vr = hadamard_transform(k.float()).to(dtype), hadamard_transform(v.float()).to(dtype)
    want = encode_tiles(kr, vr, cfg)
    _assert_codes_match(got.keys.codes, want.keys.codes, 4, _pre_round_keys(kr, want), "keys")
    _assert_codes_match(got.values.codes, want.values.codes, 2, _pre_round_values(vr, want), "values")
    _assert_metadata_close(got.keys, want.keys, torch.float32, "keys")
    _assert_metadata_close(got.values, want.values, torch.float32, "values")


@pytest.mark.parametrize("kernel", KERNELS)
def test_compress_constant_and_zero_rows(kernel):
    """Degenerate rows hit the std clamp and the step floor the same way as the reference.

    A zero row makes every imbalance score about max_std / 1e-8 ~ 1e8, where consecutive
    iterations differ only by float32 rounding; which state wins is then noise in both versions
    (the reference's own choice flips with summation order). So for that tile we require an
    equally good quantization rather than the same codes.
    """
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = torch.randn(2, 32, 64, generator=gen)
    v = torch.randn(2, 32, 64, generator=gen)
    k[0, :, 3] = 2.5  # a constant key channel
    v[0, 5, :] = 0.0  # an all-zero value token
    k[1] = 0.0  # an all-zero tile
    v[1] = 0.0
    got, want = compress.compress_tiles(k, v, cfg, kernel=kernel), encode_tiles(k, v, cfg)
    kg, vg = decode_tiles(got)
    kw, vw = decode_tiles(want)
    assert torch.isfinite(kg).all() and torch.isfinite(vg).all()
    assert torch.allclose(kg, kw, atol=1e-4)  # keys: a constant channel is not degenerate for the score
    assert (kg[1] == 0).all() and (vg[1] == 0).all()  # zero tiles come back exactly
    assert (vg[0, 5] == 0).all()  # the zero token too (its codes are 0 at the row's lo = 0)
    err_got = (vg[0] - v[0]).norm() / v[0].norm()
    err_want = (vw[0] - v[0]).norm() / v[0].norm()
    assert err_got <= 1.25 * err_want + 1e-6, (err_got, err_want)


@pytest.mark.parametrize(
    "kernel,dtype", [("v1", torch.float32), ("v3", torch.bfloat16), ("v3", torch.float16)]
)
def test_compress_constant_nonzero_tiles(kernel, dtype):
    """Whole tiles of one non-zero value: every std is 0, the normalization's scales are uniform
    but not powers of two, so the normalized tile b = x * s_c * s_t is one rounded product and its
    rows are exactly constant. The reference's codes are then all 0 (b - lo = 0) and step is the
    floor. A kernel that let the compiler fuse b's multiply into b - lo (an FMA keeps the product's
    rounding error, times 1 / STEP_FLOOR) would write QMAX codes instead: on a GPU, not here (the
    interpreter never fuses), so this pins the expected result and benchmarks/gpu_compress.py
    checks the same tiles on the GPU."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float32)
    k = torch.full((2, 32, 64), 2.5, dtype=dtype)
    v = torch.full((2, 32, 64), -1.25, dtype=dtype)
    k[1], v[1] = 0.37, 3.1  # values whose products with the scales round
    got, want = compress.compress_tiles(k, v, cfg, kernel=kernel), encode_tiles(k, v, cfg)
    assert (want.keys.codes == 0).all() and (want.values.codes == 0).all()
    assert torch.equal(got.keys.codes, want.keys.codes) and torch.equal(got.values.codes, want.values.codes)
    # metadata is not compared: every state scores the same here (all ratios 1), so rounding
    # noise picks the state in the kernels as in the codec, and states differ by a common factor
    # (the clip binding; docs/gpu_compress.md "Limits"). The decoded tiles do not depend on it.
    kg, vg = decode_tiles(got)
    assert torch.allclose(kg, k.float(), rtol=1e-5) and torch.allclose(vg, v.float(), rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_compress_empty_batch(kernel):
    cfg = KVarNConfig(tile_size=32)
    out = compress.compress_tiles(torch.zeros(0, 32, 64), torch.zeros(0, 32, 64), cfg, kernel=kernel)
    assert out.keys.codes.shape == (0, 64, 16) and out.values.codes.shape == (0, 32, 16)


def test_compress_rejects_bad_input(monkeypatch):
    cfg = KVarNConfig(tile_size=32)
    x = torch.randn(2, 32, 64)
    with pytest.raises(ValueError, match="differ in shape"):
        compress.compress_tiles(x, x[:1], cfg)
    with pytest.raises(ValueError, match="tile_size"):
        compress.compress_tiles(x[:, :16], x[:, :16], cfg)
    with pytest.raises(ValueError, match="not a tile method"):
        compress.compress_tiles(x, x, KVarNConfig(tile_size=32, method="per_token_rtn"))
    with pytest.raises(ValueError, match="power of two"):
        compress.compress_tiles(torch.randn(1, 32, 80), torch.randn(1, 32, 80), cfg)
    with pytest.raises(TypeError, match="share a dtype"):
        compress.compress_tiles(x, x.half(), cfg)
    with pytest.raises(ValueError, match="kernel='v9'"):
        compress.compress_tiles(x, x, cfg, kernel="v9")
    monkeypatch.setenv("KVARN_COMPRESS_KERNEL", "fast")
    with pytest.raises(ValueError, match="KVARN_COMPRESS_KERNEL='fast'"):
        compress.compress_tiles(x, x, cfg)


def test_default_kernel_is_gpu_checked_unless_forced(monkeypatch):
    monkeypatch.delenv("KVARN_COMPRESS_KERNEL", raising=False)
    assert compress.default_kernel() == compress.GPU_CHECKED_COMPRESS[0]
    assert set(compress.GPU_CHECKED_COMPRESS) <= set(compress.KERNELS)
    monkeypatch.setenv("KVARN_COMPRESS_KERNEL", "V3")
    assert compress.default_kernel() == "v3"


def test_v3_layouts_partition_the_tile():
    """Every launch configuration (tile sizes, head dims, dtypes, warps, lanes per token) splits
    the tile and its partial sums exactly: each element in one thread (no replicas), all lanes
    and warps used."""
    from kvarn.attention.triton import compress_v3

    for g, d, dtype, (num_warps, lanes) in itertools.product(
        [32, 64, 128], [16, 32, 64, 128, 256], [torch.bfloat16, torch.float32],
        [(4, 8), (8, 8), (2, 8), (4, 16), (4, 4), (1, 8)],
    ):  # fmt: skip
        label = f"G={g} D={d} {dtype} warps={num_warps} lanes={lanes}"
        cfg = compress_v3.kernel_config(g, d, dtype, num_warps, lanes)
        rg, ri, c2, cg, vec, w = (cfg[k] for k in ("RG", "RI", "C2", "CG", "VEC", "num_warps"))
        assert rg * ri == g and c2 * cg * vec == d and 1 <= w <= num_warps, label
        shapes = {
            "L5": [rg, ri, c2, cg, vec],
            "LT": [rg, ri, cg],
            "LC": [rg, c2, cg, vec],
            "LT2": [rg, ri, cg, 2],
            "LC2": [rg, c2, cg, vec, 2],
            "KS": [g // 2, c2, cg, vec],  # packed 4-bit keys: two tokens per byte
        }
        for name, shape in shapes.items():
            lay = cfg[name]
            assert math.prod(lay.threads_per_warp) == 32 and math.prod(lay.warps_per_cta) == w, (label, name)
            per_dim = zip(lay.size_per_thread, lay.threads_per_warp, lay.warps_per_cta, strict=True)
            assert [s * t * u for s, t, u in per_dim] == shape, (label, name)


def test_v3_persistent_launch_matches_codec():
    """v3's persistent grid (programs looping over tiles; prefetch and register cap are GPU-only
    hints, accepted here): 5 pairs on 2 programs per axis, so programs take 3 and 2 tiles."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = _outlier_tiles((5, 32, 64), torch.bfloat16, gen)
    v = _outlier_tiles((5, 32, 64), torch.bfloat16, gen)
    got = compress.compress_tiles(k, v, cfg, kernel="v3", persistent=2, prefetch=True, max_registers=128)
    _assert_matches_codec(got, k, v, cfg)


def test_v3_launch_options_reject_bad_values():
    cfg = KVarNConfig(tile_size=32)
    x = torch.randn(1, 32, 64)
    with pytest.raises(ValueError, match="v3 launch options"):
        compress.compress_tiles(x, x, cfg, kernel="v1", persistent=2)
    with pytest.raises(ValueError, match="persistent=0"):
        compress.compress_tiles(x, x, cfg, kernel="v3", persistent=0)
    with pytest.raises(ValueError, match="prefetch needs a persistent"):
        compress.compress_tiles(x, x, cfg, kernel="v3", prefetch=True)
    with pytest.raises(ValueError, match="max_registers=300"):
        compress.compress_tiles(x, x, cfg, kernel="v3", max_registers=300)


@pytest.mark.parametrize(
    "kb,vb,dtype,opts",
    [
        (4, 2, torch.bfloat16, {"fold": True}),
        (3, 8, torch.float16, {"fold": True, "half_tile": True, "tree": True}),  # 3-bit codes keep their mask
        (2, 4, torch.float32, {"half_tile": True, "max_registers": 168}),  # float32: half_tile is a no-op
        (4, 2, torch.bfloat16, {"tree": True}),
    ],
)
def test_v3_code_variants_match_codec(kb, vb, dtype, opts):
    """v3's code variants (fold: RTN on the column-scaled tile with the row scale folded into the
    code multiplier, no per-code mask; half_tile: 16-bit tile in registers, widened per sweep) keep
    the contract; tree: pairwise partial sums. Under the interpreter half_tile's asm widening is a
    plain cast (GPU-only code)."""
    cfg = KVarNConfig(key_bits=kb, value_bits=vb, tile_size=32, metadata_dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = _outlier_tiles((2, 32, 64), dtype, gen)
    v = _outlier_tiles((2, 32, 64), dtype, gen)
    _assert_matches_codec(compress.compress_tiles(k, v, cfg, kernel="v3", **opts), k, v, cfg)


def test_v3_fold_constant_tiles_and_rows():
    """fold never forms B = y * row scale: constant tiles (every B row one value: multiplier 0) must
    give the codec's all-zero codes, and constant key channels / value tokens (whose B rows vary
    with the other axis' scales) its codes up to ties."""
    cfg = KVarNConfig(key_bits=4, value_bits=2, tile_size=32, metadata_dtype=torch.float32)
    k = torch.full((2, 32, 64), 2.5, dtype=torch.bfloat16)
    v = torch.full((2, 32, 64), -1.25, dtype=torch.bfloat16)
    k[1], v[1] = 0.37, 3.1
    got, want = compress.compress_tiles(k, v, cfg, kernel="v3", fold=True), encode_tiles(k, v, cfg)
    assert (want.keys.codes == 0).all() and (want.values.codes == 0).all()
    assert torch.equal(got.keys.codes, want.keys.codes) and torch.equal(got.values.codes, want.values.codes)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = torch.randn(1, 32, 64, generator=gen)
    v = torch.randn(1, 32, 64, generator=gen)
    k[0, :, 5] = 0.75  # a constant key channel
    v[0, 7, :] = -2.0  # a constant value token
    _assert_matches_codec(compress.compress_tiles(k, v, cfg, kernel="v3", fold=True), k, v, cfg)
