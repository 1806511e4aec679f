"""One validated configuration object for every quantizer in the library.

A ``KVarNConfig`` says *what* is stored (bits, tile size, method, metadata dtype)
and nothing about *where* (cache) or *how* (PyTorch or Triton backend).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# Method name -> (rotate with Hadamard, variance-normalize, storage family).
#   "tile":      per-tile asymmetric RTN, keys per channel over G tokens, values per token,
#                with the folded (a, z, r|c) metadata of SPEC; storable by KVarNCache.
#   "token":     per-token asymmetric RTN for keys and values (no tiles needed for the math,
#                but applied tile by tile so it shares the cache's "quantize once" timing).
#   "fp8":       float8 e4m3 with one float scale per token.
#   "none":      16-bit passthrough.
METHODS: dict[str, tuple[bool, bool, str]] = {
    "kvarn": (True, True, "tile"),
    "kivi": (False, False, "tile"),
    "hadamard_rtn": (True, False, "tile"),
    "varn_norot": (False, True, "tile"),
    "per_token_rtn": (False, False, "token"),
    "fp8_e4m3": (False, False, "fp8"),
    "none": (False, False, "none"),
}

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_TILE_SIZES = (32, 64, 128)
METADATA_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}

PRESETS: dict[str, dict] = {
    "k4v2": {"key_bits": 4, "value_bits": 2},
    "k4v4": {"key_bits": 4, "value_bits": 4},
    "k3v2": {"key_bits": 3, "value_bits": 2},
    "k2v2": {"key_bits": 2, "value_bits": 2},
    "k8v8": {"key_bits": 8, "value_bits": 8},
}


class ConfigError(ValueError):
    """A configuration field has a value outside its allowed set."""


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in METADATA_DTYPES.items():
        if dt == dtype:
            return name
    return str(dtype)


@dataclass(frozen=True)
class KVarNConfig:
    """What the KV cache stores.

    Attributes:
        key_bits: bits per key code (2, 3, 4 or 8).
        value_bits: bits per value code (2, 3, 4 or 8).
        tile_size: tokens per tile G (32, 64 or 128).
        iterations: variance-normalization iterations (0 disables the loop; 8 by default).
        keep_sink_tile: keep the first tile of every sequence in 16 bits (attention sinks).
        method: one of ``METHODS``; ``"kvarn"`` is the paper's method, the others are baselines.
        metadata_dtype: dtype of the folded scales (a, z, r, c). bfloat16 by default: its range
            covers bf16 models whose K/V exceed float16's 65504 (see docs/quantizer.md for the
            accuracy cost, measured).
    """

    key_bits: int = 4
    value_bits: int = 2
    tile_size: int = 128
    iterations: int = 8
    keep_sink_tile: bool = True
    method: str = "kvarn"
    metadata_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if isinstance(self.metadata_dtype, str):
            if self.metadata_dtype not in METADATA_DTYPES:
                raise ConfigError(
                    f"metadata_dtype={self.metadata_dtype!r} is not supported; "
                    f"allowed: {sorted(METADATA_DTYPES)}"
                )
            object.__setattr__(self, "metadata_dtype", METADATA_DTYPES[self.metadata_dtype])
        if self.metadata_dtype not in METADATA_DTYPES.values():
            raise ConfigError(
                f"metadata_dtype={self.metadata_dtype} is not supported; allowed: {sorted(METADATA_DTYPES)}"
            )
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown; allowed: {sorted(METHODS)}")
        for field in ("key_bits", "value_bits"):
            bits = getattr(self, field)
            if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
                raise ConfigError(f"{field}={bits!r} is not supported; allowed: {list(SUPPORTED_BITS)}")
        if isinstance(self.tile_size, bool) or self.tile_size not in SUPPORTED_TILE_SIZES:
            raise ConfigError(
                f"tile_size={self.tile_size!r} is not supported; allowed: {list(SUPPORTED_TILE_SIZES)}"
            )
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ConfigError(f"iterations={self.iterations!r} must be an integer >= 0")
        if not isinstance(self.keep_sink_tile, bool):
            raise ConfigError(f"keep_sink_tile={self.keep_sink_tile!r} must be True or False")

    # ---- derived properties -------------------------------------------------------------
    @property
    def rotate(self) -> bool:
        """Apply the Hadamard rotation when tokens enter the cache."""
        return METHODS[self.method][0]

    @property
    def normalize(self) -> bool:
        """Run variance normalization on each tile before rounding."""
        return METHODS[self.method][1] and self.iterations > 0

    @property
    def family(self) -> str:
        """Storage family: "tile", "token", "fp8" or "none" (see ``METHODS``)."""
        return METHODS[self.method][2]

    @property
    def name(self) -> str:
        """Short label such as ``kvarn:k4v2`` (``+nosink`` when the sink tile is quantized)."""
        if self.family == "none":
            label = "none"
        elif self.family == "fp8":
            label = "fp8_e4m3"
        else:
            label = f"{self.method}:k{self.key_bits}v{self.value_bits}"
        if self.tile_size != 128:
            label += f"/g{self.tile_size}"
        if not self.keep_sink_tile and self.family != "none":
            label += "+nosink"
        return label

    def replace(self, **changes) -> KVarNConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field as plain JSON values (``metadata_dtype`` by name); ``from_dict`` inverts it."""
        fields = dataclasses.asdict(self)
        fields["metadata_dtype"] = _dtype_name(self.metadata_dtype)
        return fields

    @classmethod
    def from_dict(cls, fields: dict) -> KVarNConfig:
        """The config of ``to_dict``'s output (unknown keys are a ``ConfigError``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown KVarNConfig fields {unknown}; known: {sorted(known)}")
        return cls(**fields)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str = "k4v2", **overrides) -> KVarNConfig:
        """A named preset (``k4v2``, ``k4v4``, ``k3v2``, ``k2v2``, ``k8v8``) with field overrides."""
        key = preset.lower()
        if key not in PRESETS:
            raise ConfigError(f"preset {preset!r} is unknown; allowed: {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def parse(cls, spec: str | KVarNConfig, **overrides) -> KVarNConfig:
        """Parse ``"method[:preset]"`` (``"kvarn:k4v2"``, ``"kivi:k2v2"``, ``"k4v4"``, ``"none"``).

        A bare preset means method ``kvarn``; a bare method means preset ``k4v2``.
        """
        if isinstance(spec, KVarNConfig):
            return spec.replace(**overrides) if overrides else spec
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"cannot parse quantizer spec {spec!r}; expected e.g. 'kvarn:k4v2'")
        text = spec.strip().lower()
        method, _, preset = text.partition(":")
        if not preset and method in PRESETS:
            method, preset = "kvarn", method
        if method not in METHODS:
            raise ConfigError(f"method {method!r} in {spec!r} is unknown; allowed: {sorted(METHODS)}")
        return cls.from_preset(preset or "k4v2", method=method, **overrides)

    def bytes_per_token_per_head(self, head_dim: int) -> float:
        """Storage of one completed-tile token for one KV head, K and V together (SPEC sizes)."""
        from kvarn.codec import tile_nbytes  # local import: codec depends on this module

        return tile_nbytes(self, head_dim) / self.tile_size

    def __repr__(self) -> str:  # compact, readable in CLI tables
        return (
            f"KVarNConfig(method={self.method!r}, key_bits={self.key_bits}, value_bits={self.value_bits}, "
            f"tile_size={self.tile_size}, iterations={self.iterations}, keep_sink_tile={self.keep_sink_tile}, "
            f"metadata_dtype={_dtype_name(self.metadata_dtype)})"
        )
