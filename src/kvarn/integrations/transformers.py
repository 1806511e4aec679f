"""The "kvarn" attention implementation for transformers (AttentionInterface + AttentionMaskInterface).

``register()`` (run by ``import kvarn``) adds, under the name ``"kvarn"``:

* a **mask function** that does not build a 4D mask: it returns a :class:`KVarNMask` carrying the
  padding of this call's new tokens (the only padding a KVarN layer needs: padding is never
  stored) and, lazily, the sdpa mask for layers that are not KVarN layers;
* an **attention function** that, for a KVarN cache layer (found through the hand-off published
  by ``KVarNLayer.update``), attends over sink + packed tiles + tail + new tokens and stores the
  new tokens; for every other layer (16-bit sliding-window layers, a DynamicCache, no cache) it
  falls back to transformers' sdpa with the equivalent mask.

The user-facing switch is transformers' own: ``model.set_attn_implementation("kvarn")`` or
``from_pretrained(..., attn_implementation="kvarn")``; :func:`enable` and :func:`cache_for` do it
in one line.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.modeling_utils import AttentionInterface

from kvarn.cache import handoff
from kvarn.cache.cache import KVarNCache
from kvarn.cache.errors import CacheUsageError, UnsupportedModelError
from kvarn.config import KVarNConfig

ATTN_NAME = "kvarn"


class KVarNMask:
    """What the kvarn mask function hands to the kvarn attention function (instead of a 4D mask).

    Attributes:
        new_valid: ``[B, L]`` bool, False for padding among this call's new tokens; None if all real.
        plain_causal: the model asked for the standard causal pattern (no sliding window, no
            bidirectional or packed-sequence overlay): the only pattern a KVarN layer implements.
        past_real: real (unmasked) positions before this call per row (a host list), or None when
            the 2D mask does not cover them; a KVarN layer must hold exactly that many tokens.
    """

    def __init__(self, sdpa_kwargs: dict, new_valid, plain_causal: bool, past_real: list[int] | None) -> None:
        self._sdpa_kwargs = sdpa_kwargs
        self._sdpa_mask = None
        self._sdpa_built = False
        self.new_valid = new_valid
        self.plain_causal = plain_causal
        self.past_real = past_real

    def past_real_list(self) -> list[int] | None:
        """``past_real`` on the host (read once per forward call, shared by all layers)."""
        return self.past_real

    def sdpa(self):
        """The mask transformers' sdpa would get for this call (built once, on first use)."""
        if not self._sdpa_built:
            self._sdpa_mask = sdpa_mask(**self._sdpa_kwargs)
            self._sdpa_built = True
        return self._sdpa_mask

    def __repr__(self) -> str:
        padded = None if self.new_valid is None else int((~self.new_valid).sum())
        return f"KVarNMask(padding_tokens={padded}, plain_causal={self.plain_causal})"


def kvarn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs,
) -> KVarNMask:
    """AttentionMaskInterface function for "kvarn" (same arguments as transformers' sdpa_mask)."""
    sdpa_kwargs = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        **kwargs,
    )
    new_valid = past_real = None
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset).to(torch.bool)
        start = int(q_offset)
        new_valid = padding[:, start : start + q_length]
        if new_valid.shape[1] != q_length:
            raise CacheUsageError(
                f"the 2D attention mask has {padding.shape[1]} columns but the call's tokens occupy columns "
                f"{start}..{start + q_length - 1}"
            )
        # One host read per forward call (shared by every layer): real new tokens per row (all
        # real -> no padding handling at all) and, when the mask covers them, real past positions.
        counts = [new_valid.sum(dim=1)]
        if kv_offset == 0:
            counts.append(padding[:, :start].sum(dim=1))
        counts = torch.cat(counts).tolist()
        rows = new_valid.shape[0]
        if all(c == q_length for c in counts[:rows]):
            new_valid = None
        if kv_offset == 0:
            past_real = counts[rows:]
    plain_causal = mask_function is causal_mask_function and local_size is None
    return KVarNMask(sdpa_kwargs, new_valid, plain_causal, past_real)


def _check_call(module, layer, dropout: float, is_causal, kwargs: dict) -> None:
    where = f"kvarn attention (layer {layer.layer_idx})"
    module_idx = getattr(module, "layer_idx", None)
    if module_idx != layer.layer_idx:
        raise UnsupportedModelError(
            f"{where}: the attention module reports layer_idx={module_idx!r}; KVarNCache needs attention "
            "modules that pass their own layer index to cache.update"
        )
    if dropout:
        raise CacheUsageError(
            f"{where}: attention dropout={dropout} (training) is not supported; use model.eval()"
        )
    if is_causal is False:
        raise UnsupportedModelError(f"{where}: non-causal (bidirectional) attention is not supported")
    unsupported = {
        "softcap": "attention logit soft-capping",
        "s_aux": "attention sinks as learned logits",
        "sliding_window": "a sliding window on a full-attention layer",
        "position_bias": "additive position bias",
    }
    for key, what in unsupported.items():
        if kwargs.get(key) is not None:
            raise UnsupportedModelError(
                f"{where}: the model uses {what} ({key}=...), which kvarn does not implement"
            )


def kvarn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function for "kvarn"; returns ``([B, L, Hq, D], None)`` like sdpa."""
    layer = handoff.claim(key)
    if layer is None:
        # Not a KVarN layer (16-bit sliding-window layer, DynamicCache, no cache): plain sdpa.
        mask = attention_mask.sdpa() if isinstance(attention_mask, KVarNMask) else attention_mask
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    _check_call(module, layer, dropout, is_causal, kwargs)
    new_valid = None
    if isinstance(attention_mask, KVarNMask):
        if not attention_mask.plain_causal:
            raise UnsupportedModelError(
                f"kvarn attention (layer {layer.layer_idx}): the model asked for a non-standard mask pattern "
                "(sliding window, bidirectional/packed overlay); KVarN layers implement plain causal attention"
            )
        new_valid = attention_mask.new_valid
        past_real = attention_mask.past_real_list()
        if past_real is not None and layer.is_initialized:
            if past_real != layer.stored_lengths():
                raise CacheUsageError(
                    f"kvarn attention (layer {layer.layer_idx}): the attention mask has "
                    f"{past_real} real past positions per row but the cache holds "
                    f"{layer.stored_lengths()}: the cache belongs to another sequence; call cache.reset()"
                )
    elif attention_mask is not None:
        raise CacheUsageError(
            f"kvarn attention (layer {layer.layer_idx}) got a {type(attention_mask).__name__} mask of shape "
            f"{tuple(getattr(attention_mask, 'shape', ()))}; it needs the 2D padding mask (pass "
            "attention_mask=[batch, positions] of 0/1, not a prepared 4D mask)"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return layer.attend(module, query, new_valid, scaling), None


def register() -> None:
    """Register "kvarn" in transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvarn_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, kvarn_mask)


def enable(model, *, graph_generate: bool = False):
    """Switch ``model`` to the "kvarn" attention implementation; returns the model.

    ``graph_generate=True`` also patches this model's ``generate`` to decode through
    ``GraphDecoder`` (CUDA graphs) whenever that gives the same result
    (:func:`kvarn.integrations.fast_generate.install_graph_generation`; the context-manager form
    is ``kvarn.graph_generation(model)``).
    """
    register()
    model.set_attn_implementation(ATTN_NAME)
    found = getattr(model.config, "_attn_implementation", None)
    if found != ATTN_NAME:
        raise UnsupportedModelError(
            f"{type(model).__name__} kept attention implementation {found!r}: it does not dispatch through "
            "transformers' AttentionInterface, so kvarn cannot attend over its cache"
        )
    if graph_generate:
        from kvarn.integrations.fast_generate import install_graph_generation  # it imports this module

        install_graph_generation(model)
    return model


def cache_for(model, quant: KVarNConfig | str = "k4v2", **overrides) -> KVarNCache:
    """``enable(model)`` and return a fresh ``KVarNCache`` for it (one per generation)."""
    enable(model)
    return KVarNCache(config=model.config, quant=quant, **overrides)
