"""Fused tile compression: (optional rotation) + variance normalization + RTN + packing, K and V.

``compress_tiles`` is the entry point for both kernels: v1 (this module: the first kernel, the
baseline, and the only one that rotates) and v3 (``compress_v3.py``: same result, fewer
instructions, Gluon with hand-chosen layouts). Which one runs by default: ``default_kernel()``;
docs/gpu_compress.md compares them (and v2, a plain-Triton kernel removed in session 3: v3 was
faster everywhere). The rest of this docstring describes v1; v3 shares its contract.

One launch compresses any number of (tile, KV head) pairs, keys and values together: program
``(n, 0)`` encodes key tile ``n`` and program ``(n, 1)`` its value tile. Each program keeps its
tile ``[G, D]`` in registers in float32 and never writes an intermediate to memory. The output is
exactly the layout of :class:`kvarn.codec.QuantizedTiles`, so ``kvarn.codec.decode_tiles`` decodes
it; the slow twin is ``kvarn.codec.encode_tiles`` (after ``hadamard_transform`` when rotating).

The variance normalization follows SPEC step 3 (all iterations, identity competes, ties to the
later iteration, clamps and clips, unbiased std, float32) with one algebraic shortcut that changes
only float32 rounding: the std of a row does not depend on that row's own scale, so
``rowstd(X / e^u / e^w) = rowstd(X / e^u) * e^-w`` (and the same for columns). Each iteration then
needs one row-std pass over ``X * e^-u`` and one column-std pass over ``X * e^-w`` instead of
materializing the normalized tile three times. Codes therefore match the reference except where a
value sits within float32 noise of a rounding boundary; metadata matches within float32 rounding
(before the cast to the metadata dtype). One exception, shared with the reference itself: when a
tile has an all-constant row or column its imbalance scores are ~max_std / 1e-8 and consecutive
iterations differ only by float32 rounding, so which state wins is rounding noise (the
quantization is equally good either way; tests/triton_kernels checks that).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from kvarn.attention.triton import interpreting
from kvarn.codec import QuantizedKeys, QuantizedTiles, QuantizedValues
from kvarn.config import KVarNConfig
from kvarn.method.hadamard import hadamard_blocks, hadamard_matrix
from kvarn.method.normalize import IMBALANCE_FLOOR, LOG_SCALE_MAX, LOG_SCALE_MIN, STD_MAX, STD_MIN
from kvarn.method.rtn import STEP_FLOOR

# Adding then subtracting 1.5 * 2**23 rounds a float32 in [0, 2**22) to the nearest integer with
# ties to even, exactly like torch.round (the interpreter has no libdevice rint).
_ROUND_MAGIC = tl.constexpr(12582912.0)
# The SPEC constants, as compile-time constants for the kernels.
_STD_MIN = tl.constexpr(STD_MIN)
_STD_MAX = tl.constexpr(STD_MAX)
_LOG_MIN = tl.constexpr(LOG_SCALE_MIN)
_LOG_MAX = tl.constexpr(LOG_SCALE_MAX)
_FLOOR = tl.constexpr(IMBALANCE_FLOOR)
_STEP_FLOOR = tl.constexpr(STEP_FLOOR)

# Kernels: "v3" (compress_v3.py, Gluon) and "v1" (below, the baseline and the only one that
# rotates). compress_tiles runs by default the first kernel of GPU_CHECKED_COMPRESS, the kernels
# that have passed scripts/gpu_check.py on a GPU, fastest first; KVARN_COMPRESS_KERNEL=v1|v3 forces
# one (benchmarks, checks, trying an unchecked kernel).
KERNELS = ("v3", "v1")
# v3 passed on an H100 (session 2: 10 gpu_check cases, 2,048-pair checks; 10.7 ms for the 32k x 32
# layers x 8 heads K4V2 workload vs v1 23.2 ms, docs/gpu_compress.md).
GPU_CHECKED_COMPRESS = ("v3", "v1")
# The last compiled launch (registers, spills) for benchmark diagnostics.
LAST_LAUNCH: list = [None]


@triton.jit
def _std_axis0(x, n: tl.constexpr):
    """Unbiased std of each column of x [R, C] over its R rows (two-pass, float32) -> [C]."""
    mean = tl.sum(x, axis=0) / n
    dev = x - mean[None, :]
    return tl.sqrt(tl.sum(dev * dev, axis=0) / (n - 1))


@triton.jit
def _std_axis1(x, n: tl.constexpr):
    """Unbiased std of each row of x [R, C] over its C columns -> [R]."""
    mean = tl.sum(x, axis=1) / n
    dev = x - mean[:, None]
    return tl.sqrt(tl.sum(dev * dev, axis=1) / (n - 1))


@triton.jit
def _ratio(s):
    return tl.max(s, axis=0) / tl.maximum(tl.min(s, axis=0), _FLOOR)


@triton.jit
def _log_step(log_scale, std):
    """One normalization step on a log-scale vector: clip(u + log(clamp(std)))."""
    s = tl.minimum(tl.maximum(std, _STD_MIN), _STD_MAX)
    return tl.minimum(tl.maximum(log_scale + tl.log(s), _LOG_MIN), _LOG_MAX)


@triton.jit
def _normalize(x, IS_KEY: tl.constexpr, ITERS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """Best (per-token, per-channel) log scales of the tile x [G, D] (token-major).

    A key tile is [D, G] in SPEC terms (rows = channels, columns = tokens): its column step
    scales tokens and its row step channels. A value tile is [G, D] (rows = tokens): its column
    step scales channels and its row step tokens. ``std_t`` is the std of each token over channels
    of the current normalized tile, ``std_c`` each channel's over tokens.
    """
    lt = tl.zeros([G], dtype=tl.float32)  # log scale per token
    lc = tl.zeros([D], dtype=tl.float32)  # log scale per channel
    std_t = _std_axis1(x, D)
    std_c = _std_axis0(x, G)
    best = _ratio(std_t) + _ratio(std_c)
    best_lt = lt
    best_lc = lc
    for _ in range(ITERS):
        if IS_KEY:
            lt = _log_step(lt, std_t)  # column step: tokens
            sc = _std_axis0(x * tl.exp(-lt)[:, None], G)  # channel stds, before channel scaling
            lc = _log_step(lc, sc * tl.exp(-lc))  # row step: channels
            std_c = sc * tl.exp(-lc)
            std_t = _std_axis1(x * tl.exp(-lc)[None, :], D) * tl.exp(-lt)
        else:
            lc = _log_step(lc, std_c)  # column step: channels
            st = _std_axis1(x * tl.exp(-lc)[None, :], D)
            lt = _log_step(lt, st * tl.exp(-lt))  # row step: tokens
            std_t = st * tl.exp(-lt)
            std_c = _std_axis0(x * tl.exp(-lt)[:, None], G) * tl.exp(-lc)
        score = _ratio(std_t) + _ratio(std_c)
        keep = score <= best  # ties go to the later iteration
        best = tl.where(keep, score, best)
        best_lt = tl.where(keep, lt, best_lt)
        best_lc = tl.where(keep, lc, best_lc)
    return best_lt, best_lc


@triton.jit
def _round_to_bf16(x):
    """Round float32 to the nearest bfloat16 (ties to even), kept in float32. Done on the bits
    because Triton's interpreter truncates float32 -> bfloat16 casts."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _round_codes(x, lo, inv_step, QMAX: tl.constexpr, INTERPRET: tl.constexpr):
    """RTN codes of x [.., ..] with per-row lo and 1 / step (broadcast operands).

    ``x - lo`` is rounded on its own (``sub_rn``): a plain subtraction lets the compiler fuse the
    multiply that produced x (x = y * s) into an FMA, fma(y, s, -lo), which for a constant row
    leaves the product's rounding error instead of 0; times 1 / step (1 / STEP_FLOOR there) that
    is a code of QMAX where the reference has 0, and on rows spanning a few float32 ulps, codes off
    by several steps (the decoded values stay within an ulp either way). The reference subtracts
    rounded values. The interpreter has no libdevice and never fuses."""
    if INTERPRET:
        v = (x - lo) * inv_step
    else:
        v = libdevice.sub_rn(x, lo) * inv_step
    v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.minimum(tl.maximum(v, 0.0), QMAX).to(tl.int32)


@triton.jit
def _pack_store(
    codes, base, row_stride, AXIS: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr
):
    """Pack int32 codes [G, D] along AXIS (0: tokens, for keys; 1: channels, for values) and store.

    Keys go to ``base + d * row_stride + byte`` ([D, G*bits/8]); values to
    ``base + t * row_stride + byte`` ([G, D*bits/8]).
    """
    if BITS == 3:
        PER: tl.constexpr = 8
    else:
        PER: tl.constexpr = 8 // BITS
    if AXIS == 0:
        NG: tl.constexpr = G // PER
        grouped = tl.reshape(codes, [NG, PER, D])
        shift = (tl.arange(0, PER) * BITS)[None, :, None]
        word = tl.sum(grouped << shift, axis=1)  # [NG, D]
        grp = tl.arange(0, NG)[:, None]
        ch = tl.arange(0, D)[None, :]
        if BITS == 3:
            ptr = base + ch * row_stride + grp * 3
            tl.store(ptr, (word & 255).to(tl.uint8))
            tl.store(ptr + 1, ((word >> 8) & 255).to(tl.uint8))
            tl.store(ptr + 2, ((word >> 16) & 255).to(tl.uint8))
        else:
            tl.store(base + ch * row_stride + grp, word.to(tl.uint8))
    else:
        NG: tl.constexpr = D // PER
        grouped = tl.reshape(codes, [G, NG, PER])
        shift = (tl.arange(0, PER) * BITS)[None, None, :]
        word = tl.sum(grouped << shift, axis=2)  # [G, NG]
        tok = tl.arange(0, G)[:, None]
        grp = tl.arange(0, NG)[None, :]
        if BITS == 3:
            ptr = base + tok * row_stride + grp * 3
            tl.store(ptr, (word & 255).to(tl.uint8))
            tl.store(ptr + 1, ((word >> 8) & 255).to(tl.uint8))
            tl.store(ptr + 2, ((word >> 16) & 255).to(tl.uint8))
        else:
            tl.store(base + tok * row_stride + grp, word.to(tl.uint8))


@triton.jit
def _compress_one(
    x_ptr,
    x_stride_n,
    x_stride_t,
    h_ptr,
    hscale_ptr,
    codes_ptr,
    a_ptr,
    z_ptr,
    s_ptr,
    n,
    IS_KEY: tl.constexpr,
    BITS: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    ITERS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ROTATE: tl.constexpr,
    ROT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    t = tl.arange(0, G)
    d = tl.arange(0, D)
    n64 = n.to(tl.int64)
    raw = tl.load(x_ptr + n64 * x_stride_n + t[:, None] * x_stride_t + d[None, :])
    if ROTATE:
        # x @ H with H = (+-1 blocks) * per-column 1/sqrt(block): the +-1 products are exact in the
        # input dtype, accumulation is float32; then round to the input dtype as the cache stores
        # rotated tokens in the model dtype (what hadamard_transform(x).to(dtype) does).
        hm = tl.load(h_ptr + d[:, None] * D + d[None, :])
        if INTERPRET:  # the interpreter keeps bf16 as raw uint16 bits: multiply in float32
            rot = tl.dot(raw.to(tl.float32), hm.to(tl.float32), input_precision="ieee")
        else:
            rot = tl.dot(raw, hm, input_precision=ROT_PRECISION, out_dtype=tl.float32)
        rot = rot * tl.load(hscale_ptr + d)[None, :]
        if raw.dtype == tl.bfloat16:
            x = _round_to_bf16(rot)
        else:
            x = rot.to(raw.dtype).to(tl.float32)
    else:
        x = raw.to(tl.float32)
    if NORMALIZE:
        lt, lc = _normalize(x, IS_KEY, ITERS, G, D)
        inv_t = tl.exp(-lt)
        inv_c = tl.exp(-lc)
        # B = X / s_col / s_row in SPEC's order (column scale first).
        if IS_KEY:
            b = x * inv_t[:, None] * inv_c[None, :]
        else:
            b = x * inv_c[None, :] * inv_t[:, None]
        s_t = tl.exp(lt)
        s_c = tl.exp(lc)
    else:
        b = x
        s_t = tl.full([G], 1.0, tl.float32)
        s_c = tl.full([D], 1.0, tl.float32)
    QMAX: tl.constexpr = (1 << BITS) - 1
    md = a_ptr.dtype.element_ty
    if IS_KEY:
        # RTN per channel over the tile's tokens; a, z per channel, r per token.
        lo = tl.min(b, axis=0)
        step = tl.maximum((tl.max(b, axis=0) - lo) / QMAX, _STEP_FLOOR)
        codes = _round_codes(b, lo[None, :], (1.0 / step)[None, :], QMAX, INTERPRET)
        ROW: tl.constexpr = G * BITS // 8
        _pack_store(codes, codes_ptr + n64 * (D * ROW), ROW, 0, BITS, G, D)
        tl.store(a_ptr + n64 * D + d, (s_c * step).to(md))
        tl.store(z_ptr + n64 * D + d, (s_c * lo).to(md))
        tl.store(s_ptr + n64 * G + t, s_t.to(md))
    else:
        # RTN per token over channels; a, z per token, c per channel.
        lo = tl.min(b, axis=1)
        step = tl.maximum((tl.max(b, axis=1) - lo) / QMAX, _STEP_FLOOR)
        codes = _round_codes(b, lo[:, None], (1.0 / step)[:, None], QMAX, INTERPRET)
        ROW: tl.constexpr = D * BITS // 8
        _pack_store(codes, codes_ptr + n64 * (G * ROW), ROW, 1, BITS, G, D)
        tl.store(a_ptr + n64 * G + t, (s_t * step).to(md))
        tl.store(z_ptr + n64 * G + t, (s_t * lo).to(md))
        tl.store(s_ptr + n64 * D + d, s_c.to(md))


@triton.jit
def _compress_kernel(
    k_ptr,
    k_stride_n,
    k_stride_t,
    v_ptr,
    v_stride_n,
    v_stride_t,
    h_ptr,
    hscale_ptr,
    kc_ptr,
    ka_ptr,
    kz_ptr,
    kr_ptr,
    vc_ptr,
    va_ptr,
    vz_ptr,
    vs_ptr,
    KB: tl.constexpr,
    VB: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    ITERS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ROTATE: tl.constexpr,
    ROT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    n = tl.program_id(0)
    if tl.program_id(1) == 0:
        _compress_one(
            k_ptr, k_stride_n, k_stride_t, h_ptr, hscale_ptr, kc_ptr, ka_ptr, kz_ptr, kr_ptr, n,
            True, KB, G, D, ITERS, NORMALIZE, ROTATE, ROT_PRECISION, INTERPRET,
        )  # fmt: skip
    else:
        _compress_one(
            v_ptr, v_stride_n, v_stride_t, h_ptr, hscale_ptr, vc_ptr, va_ptr, vz_ptr, vs_ptr, n,
            False, VB, G, D, ITERS, NORMALIZE, ROTATE, ROT_PRECISION, INTERPRET,
        )  # fmt: skip


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def supports(config: KVarNConfig, head_dim: int, dtype: torch.dtype) -> str | None:
    """None when the kernel handles this configuration, else the reason it does not."""
    if config.family != "tile":
        return f"method {config.method!r} is not a tile method"
    if not _is_pow2(head_dim) or head_dim < 16:
        return f"head_dim={head_dim} is not a power of two >= 16"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not float16/bfloat16/float32"
    return None


@torch.no_grad()
def _rotation_operands(d: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(+-1 block-Hadamard matrix in ``dtype``, per-column 1/sqrt(block) float32)."""
    sizes = hadamard_blocks(d)
    scale = torch.cat([torch.full((s,), 1.0 / math.sqrt(s), dtype=torch.float64) for s in sizes])
    signs = hadamard_matrix(d, torch.float64) / scale  # exact +-1 / 0 entries
    return signs.round().to(dtype=dtype, device=device).contiguous(), scale.to(torch.float32).to(device)


def default_kernel() -> str:
    """The kernel ``compress_tiles`` runs when not told (KVARN_COMPRESS_KERNEL, else the first
    GPU-checked one)."""
    forced = os.environ.get("KVARN_COMPRESS_KERNEL", "").strip().lower()
    if forced and forced not in KERNELS:
        raise ValueError(f"KVARN_COMPRESS_KERNEL={forced!r}: expected one of {KERNELS}")
    return forced or GPU_CHECKED_COMPRESS[0]


def compress_tiles(
    k_tiles: torch.Tensor,
    v_tiles: torch.Tensor,
    config: KVarNConfig,
    *,
    rotate: bool = False,
    out: QuantizedTiles | None = None,
    kernel: str | None = None,
    num_warps: int | None = None,
    lanes_per_token: int | None = None,
    persistent: int | None = None,
    prefetch: bool = False,
    max_registers: int | None = None,
    half_tile: bool | None = None,
    fold: bool | None = None,
    tree: bool | None = None,
) -> QuantizedTiles:
    """Quantize matching key and value tiles ``[..., G, D]`` with one fused launch.

    Args:
        k_tiles, v_tiles: tiles token-major in the cache frame, or in the original frame with
            ``rotate=True`` (the kernel then applies the Hadamard rotation and rounds the rotated
            tokens to the input dtype first, exactly what the cache stores).
        config: a tile-family configuration (kvarn, kivi, hadamard_rtn, varn_norot).
        out: optional destination with exactly the returned layout (contiguous tensors), e.g.
            pre-poisoned buffers in checks; written in place and returned.
        kernel: "v3" or "v1" (see ``KERNELS``); None: ``default_kernel()``. With
            ``rotate=True`` v1 runs whatever is asked (v3 does not rotate).
        num_warps, lanes_per_token: launch options for benchmarks (v3: lanes that share a token).
        persistent, prefetch, max_registers: v3 launch options for benchmarks. ``persistent=R``
            launches R programs per SM (half keys, half values) that loop over the tiles instead of
            one program per tile; ``prefetch`` (with ``persistent``) has each program ask L2 for
            its next tile before encoding the current one; ``max_registers`` caps registers per
            thread (ptxas ``maxnreg``; spills instead), e.g. 128 for two 8-warp programs per SM.
        half_tile, fold, tree: v3 code variants for benchmarks (same contract). ``half_tile`` keeps a
            16-bit tile in registers in its input dtype (half the registers, one widening
            instruction per element per sweep; with ``max_registers=168`` three programs fit per
            SM). ``fold`` rounds the column-scaled tile with the row scale folded into the code
            multiplier (one multiply per element less) and skips the per-code mask for 2/4/8 bits.
            ``tree`` adds the partial moments after each transpose pairwise (shorter dependent
            chains between the sweeps, same instruction count). None (default): ``fold`` and
            ``tree`` on for v3; ``half_tile`` with a 168-register cap for 16-bit 128 x 128 tiles
            on v3 (H100, 32k tokens x 32 layers x 8 heads K4V2, medians of 5 rounds: 9.43 ms vs
            9.78 ms without the three, 9.58 ms with fold and tree only; docs/gpu_compress.md).

    Returns:
        :class:`QuantizedTiles` with the codec's layout and ``config.metadata_dtype`` metadata.
        Inputs are not checked for NaN/Inf (that would synchronize); non-finite tokens give
        non-finite metadata.
    """
    if k_tiles.shape != v_tiles.shape:
        raise ValueError(
            f"key tiles {tuple(k_tiles.shape)} and value tiles {tuple(v_tiles.shape)} differ in shape"
        )
    if k_tiles.dtype != v_tiles.dtype:
        raise TypeError(f"key tiles ({k_tiles.dtype}) and value tiles ({v_tiles.dtype}) must share a dtype")
    if k_tiles.ndim < 2:
        raise ValueError(f"tiles must be [..., G, D], got shape {tuple(k_tiles.shape)}")
    g, d = k_tiles.shape[-2:]
    if g != config.tile_size:
        raise ValueError(f"tiles have {g} tokens, config.tile_size is {config.tile_size}")
    reason = supports(config, d, k_tiles.dtype)
    if reason:
        raise ValueError(f"the Triton compression kernel does not handle this input: {reason}")
    lead = k_tiles.shape[:-2]
    k = k_tiles.reshape(-1, g, d)
    v = v_tiles.reshape(-1, g, d)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    n = k.shape[0]
    dev, md = k.device, config.metadata_dtype
    kb, vb = config.key_bits, config.value_bits
    shapes = {
        "keys.codes": ((n, d, g * kb // 8), torch.uint8),
        "keys.scale": ((n, d), md),
        "keys.zero": ((n, d), md),
        "keys.token_scale": ((n, g), md),
        "values.codes": ((n, g, d * vb // 8), torch.uint8),
        "values.scale": ((n, g), md),
        "values.zero": ((n, g), md),
        "values.channel_scale": ((n, d), md),
    }
    if out is None:
        bufs = [torch.empty(shape, dtype=dt, device=dev) for shape, dt in shapes.values()]
    else:
        bufs = []
        for name, (shape, dt) in shapes.items():
            part, field = name.split(".")
            t = getattr(getattr(out, part), field)
            if t.dtype != dt or t.numel() != math.prod(shape) or not t.is_contiguous() or t.device != dev:
                raise ValueError(
                    f"out.{name} must be a contiguous {dt} tensor of {math.prod(shape)} elements on {dev}"
                )
            bufs.append(t.view(shape))
    kc, ka, kz, kr, vc, va, vz, vs = bufs
    kernel = kernel or default_kernel()
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
    v3_tuned = kernel == "v3" and not rotate
    if fold is None:
        fold = v3_tuned
    if tree is None:
        tree = v3_tuned
    if half_tile is None:
        half_tile = v3_tuned and k.dtype in (torch.bfloat16, torch.float16) and g == 128 and d == 128
        if half_tile and max_registers is None and persistent is None:
            max_registers = 168  # three programs per SM
    if kernel != "v3" and (persistent or prefetch or max_registers or half_tile or fold or tree):
        raise ValueError(
            "persistent, prefetch, max_registers, half_tile, fold and tree are v3 launch options"
        )
    if num_warps is None:
        # 128 tile elements per thread (4 warps for 128 x 128): the tile stays in registers
        num_warps = max(1, min(8, g * d // 4096))
    if n and kernel == "v3" and not rotate:
        from kvarn.attention.triton import compress_v3

        cfg = compress_v3.kernel_config(g, d, k.dtype, num_warps, lanes_per_token or 8, key_bits=kb)
        cfg.update(
            compress_v3.launch_options(
                n,
                k,
                persistent,
                prefetch,
                max_registers,
                cfg["num_warps"],
                half_tile=half_tile,
                fold=fold,
                tree=tree,
            )
        )
        programs = cfg.pop("programs")
        LAST_LAUNCH[0] = compress_v3._compress_kernel_v3[(programs, 2)](
            k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), kc, ka, kz, kr, vc, va, vz, vs, n, programs,
            KB=kb, VB=vb, G=g, D=d, ITERS=config.iterations, NORMALIZE=config.normalize,
            COMPILED=not interpreting(), **cfg,
        )  # fmt: skip
    elif n:
        if rotate:
            hm, hscale = _rotation_operands(d, k.dtype, dev)
        else:
            hm = hscale = ka  # unused placeholders
        prec = "tf32x3" if k.dtype == torch.float32 else "tf32"  # 16-bit dots are exact here
        LAST_LAUNCH[0] = _compress_kernel[(n, 2)](
            k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), hm, hscale,
            kc, ka, kz, kr, vc, va, vz, vs,
            KB=kb, VB=vb, G=g, D=d, ITERS=config.iterations, NORMALIZE=config.normalize,
            ROTATE=bool(rotate), ROT_PRECISION=prec, INTERPRET=interpreting(), num_warps=num_warps,
        )  # fmt: skip
    keys = QuantizedKeys(
        codes=kc.reshape(*lead, d, g * kb // 8), scale=ka.reshape(*lead, d), zero=kz.reshape(*lead, d),
        token_scale=kr.reshape(*lead, g), bits=kb,
    )  # fmt: skip
    values = QuantizedValues(
        codes=vc.reshape(*lead, g, d * vb // 8), scale=va.reshape(*lead, g), zero=vz.reshape(*lead, g),
        channel_scale=vs.reshape(*lead, d), bits=vb,
    )  # fmt: skip
    return QuantizedTiles(keys, values)
