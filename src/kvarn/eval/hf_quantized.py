"""transformers' own ``QuantizedCache`` (optimum-quanto backend) as an evaluation method: ``hf_quanto``.

This is the quantized cache a transformers user would otherwise pick
(``QuantizedCache(backend="quanto", config=model.config)``), run as it ships: the real cache class
drives the model; nothing is simulated. What it stores, read from transformers 5.17
(``cache_utils.QuantizedLayer`` / ``QuantoQuantizedLayer``) with its defaults ``axis_key =
axis_value = 0``, ``q_group_size = 64``, ``residual_length = 128``:

* **Keys and values alike, per token**: quanto's group-wise quantization with axis 0 reshapes the
  contiguous ``[batch, kv_heads, tokens, head_dim]`` tensor to rows of ``q_group_size`` consecutive
  elements, i.e. along ``head_dim``: one group per token and head at head_dim 64 (two half-vectors
  at 128). Each group gets an asymmetric min-max scale and shift (``MaxOptimizer``), stored in the
  model's dtype. (transformers' docstring says "per-channel"; with axis 0 it is per token. Per-channel
  keys, as in KIVI, would be ``axis_key=-1``; we keep the defaults, which is what users get.)
* **Same bits for keys and values**: ``nbits`` 4 (qint4, the default) or 2 (qint2), hence the
  names ``hf_quanto:k4v4`` and ``hf_quanto:k2v2``.
* **No sink**: the first tokens are quantized like every other token.
* **Prefill**: the first ``update`` (the prompt) attends in 16 bits, then the whole prompt is
  quantized. Later tokens wait in a 16-bit residual; when a token arrives while the residual holds
  ``residual_length - 1`` tokens, the whole cache (old codes de-quantized, residual, new token) is
  quantized again in one piece. Re-quantizing a min-max group reproduces its codes (the levels move
  by float rounding only, tested), so tokens effectively stay as first quantized.

``q_group_size`` is transformers' 64 when ``head_dim`` is a multiple of 64; for other head sizes it
is the largest divisor of ``head_dim`` below 64, so that a group never spans two tokens.

Teacher forcing (the perplexity suite) feeds text in chunks, but this cache decides on each
``update`` whether to flush, so a chunk of n tokens does not behave like n decoding steps.
:func:`forward_like_decoding` splits every chunk into pieces that do: at most ``residual_length -
1 - residual`` tokens while no flush is due, and the flushing token on its own. Each query then
sees exactly the cache it would see during token-by-token decoding (tested against token-by-token
forwarding). The accumulation suite cannot use this cache (see :func:`reject_in_accumulation`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

METHOD = "hf_quanto"
PRESET_BITS = {"k4v4": 4, "k2v2": 2}  # quanto stores keys and values with the same bits (qint4 / qint2)
DEFAULT_PRESET = "k4v4"  # transformers' default nbits=4
DEFAULT_RESIDUAL_LENGTH = 128
DEFAULT_GROUP_SIZE = 64
INSTALL_HINT = "pip install optimum-quanto  (or: pip install 'kvarn[bench]')"


class HFQuantizedUnavailable(ImportError):
    """transformers' quanto-backed QuantizedCache cannot be built here (optimum-quanto missing or too old)."""


@dataclass(frozen=True)
class HFQuantoMethod:
    """transformers' ``QuantizedCache(backend="quanto")`` with ``nbits`` for keys and values."""

    nbits: int = 4
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    max_group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.nbits not in PRESET_BITS.values():
            raise ValueError(f"hf_quanto nbits={self.nbits!r}: quanto supports 2 or 4")
        if not isinstance(self.residual_length, int) or self.residual_length < 2:
            raise ValueError(f"hf_quanto residual_length={self.residual_length!r} must be an integer >= 2")
        if not isinstance(self.max_group_size, int) or self.max_group_size < 1:
            raise ValueError(f"hf_quanto max_group_size={self.max_group_size!r} must be an integer >= 1")

    # The fields the suites read from every method (same names as KVarNConfig's).
    method = METHOD
    family = "hf_quantized"
    keep_sink_tile = False

    @property
    def key_bits(self) -> int:
        return self.nbits

    @property
    def value_bits(self) -> int:
        return self.nbits

    @property
    def name(self) -> str:
        return f"{METHOD}:k{self.nbits}v{self.nbits}"

    @classmethod
    def parse(cls, item: str) -> HFQuantoMethod:
        """``hf_quanto``, ``hf_quanto:k4v4`` or ``hf_quanto:k2v2``."""
        method, _, preset = item.strip().lower().partition(":")
        if method != METHOD:
            raise ValueError(f"{item!r} is not an {METHOD} method")
        preset = preset or DEFAULT_PRESET
        if preset not in PRESET_BITS:
            raise ValueError(
                f"{item!r}: {METHOD} quantizes keys and values with the same bits (quanto qint4 / qint2); "
                f"allowed: {', '.join(f'{METHOD}:{p}' for p in PRESET_BITS)}"
            )
        return cls(nbits=PRESET_BITS[preset])

    def group_size(self, head_dim: int) -> int:
        """quanto's ``q_group_size`` for this head size: the largest divisor of head_dim <= max_group_size."""
        return max(g for g in range(1, min(head_dim, self.max_group_size) + 1) if head_dim % g == 0)

    def check_available(self) -> None:
        """Build one quanto layer (transformers checks optimum-quanto's presence and version there)."""
        try:
            from transformers.cache_utils import QuantoQuantizedLayer

            QuantoQuantizedLayer(nbits=self.nbits)
        except ImportError as exc:
            raise HFQuantizedUnavailable(
                f"method {self.name} is transformers' QuantizedCache with the optimum-quanto backend, which "
                f"cannot be used here ({exc}); {INSTALL_HINT}"
            ) from exc

    def new_cache(self, model_config):
        """An empty ``QuantizedCache`` for a model with ``model_config``."""
        from transformers.cache_utils import QuantizedCache

        self.check_available()
        return QuantizedCache(
            backend="quanto",
            config=model_config,
            nbits=self.nbits,
            axis_key=0,
            axis_value=0,
            q_group_size=self.group_size(head_dim_of(model_config)),
            residual_length=self.residual_length,
        )

    def prefilled_cache(self, layers_kv: Iterable[tuple[torch.Tensor, torch.Tensor]], model_config):
        """The cache as a prefill of these 16-bit keys/values leaves it (the whole prompt quantized).

        The prefill's own attention read the 16-bit keys/values (the first ``update`` returns its
        input), so a 16-bit prefill computed elsewhere gives the same logits.
        """
        cache = self.new_cache(model_config)
        layers_kv = list(layers_kv)
        if len(layers_kv) != len(cache.layers):
            raise ValueError(f"{len(layers_kv)} prefilled layers for a model with {len(cache.layers)} layers")
        for layer, (keys, values) in zip(cache.layers, layers_kv, strict=True):
            layer.update(keys, values)
        return cache

    def settings(self, head_dim: int | None = None) -> dict:
        return {
            "name": self.name,
            "method": METHOD,
            "family": "transformers QuantizedCache (optimum-quanto backend)",
            "key_bits": self.nbits,
            "value_bits": self.nbits,
            "residual_length": self.residual_length,
            "q_group_size": self.group_size(head_dim) if head_dim else f"<= {self.max_group_size}",
            "axis_key": 0,
            "axis_value": 0,
            "grouping": "per token and head, groups of q_group_size channels, min-max asymmetric",
            "keep_sink_tile": False,
            "scale_dtype": "the model's dtype",
        }


def head_dim_of(model_config) -> int:
    config = (
        model_config.get_text_config(decoder=True)
        if hasattr(model_config, "get_text_config")
        else model_config
    )
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def residual_tokens(cache) -> int:
    """Tokens waiting in the 16-bit residual of layer 0 (all layers move together)."""
    keys = cache.layers[0].keys
    return keys.shape[-2] if keys is not None and keys.dim() == 4 else 0


def next_piece(cache, left: int) -> int:
    """How many of the next ``left`` tokens one forward may take and still behave like decoding.

    The first update is the prefill (any length). Later, an update flushes when the residual holds
    at least ``residual_length - 1`` tokens; token-by-token decoding flushes at exactly that token.
    So a piece either fits in the residual without reaching a flush, or is the flushing token alone.
    """
    layer = cache.layers[0]
    if not layer.is_initialized:
        return left
    room = layer.residual_length - 1 - residual_tokens(cache)
    return 1 if room <= 0 else min(left, room)


@torch.no_grad()
def forward_like_decoding(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Teacher-forced logits ``[n, vocab]`` (float32) of ``input_ids`` [1, n] over a ``QuantizedCache``,
    equal (up to float rounding) to feeding the tokens one at a time."""
    input_ids = input_ids.to(model.device)
    parts, start, n = [], 0, input_ids.shape[1]
    while start < n:
        piece = next_piece(cache, n - start)
        out = model(input_ids=input_ids[:, start : start + piece], past_key_values=cache, use_cache=True)
        parts.append(out.logits[0].float())
        start += piece
    return torch.cat(parts)


def reject_in_accumulation(methods) -> None:
    """The accumulation suite needs a simulated cache: say why before any work starts."""
    from kvarn.eval.common import EvalInputError

    hf = [m.name for m in methods if isinstance(m, HFQuantoMethod)]
    if hf:
        raise EvalInputError(
            f"the accumulation suite cannot run {', '.join(hf)}: it compares every layer against a shadow "
            "cache fed the 16-bit keys/values and runs all methods in lockstep tile-sized chunks, which needs "
            "kvarn's SimulatedQuantizedCache; transformers' QuantizedCache runs in the perplexity, divergence, "
            "humaneval and passkey suites"
        )
