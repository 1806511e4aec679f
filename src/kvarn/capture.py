"""Capturing a model's real post-RoPE queries, keys and values, exactly as attention receives them.

A recording attention function is registered once in transformers' ``AttentionInterface`` (and its
mask function in ``AttentionMaskInterface``) under the name ``"kvarn_capture"``. Inside
``record_attention(model)`` the model is switched to that implementation; the function stores
its inputs (queries ``[B, Hq, T, D]``, keys and values ``[B, Hkv, T, D]`` after RoPE, i.e. what a KV
cache stores, plus the module's ``scaling``) and delegates to transformers' SDPA attention, so the
model's outputs are those of its SDPA implementation. The previous implementation is restored on
exit, also after an exception.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

CAPTURE_IMPLEMENTATION = "kvarn_capture"


@dataclass
class LayerQKV:
    """What one attention layer received in one forward pass."""

    layer_idx: int
    queries: torch.Tensor  # [B, Hq, T, D], post-RoPE
    keys: torch.Tensor  # [B, Hkv, T_kv, D], post-RoPE (what the KV cache holds)
    values: torch.Tensor  # [B, Hkv, T_kv, D]
    scaling: float
    attention_mask: torch.Tensor | None  # as the SDPA delegate received it (None: plain causal)

    @property
    def num_key_value_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


class _Recorder:
    def __init__(self, device: torch.device | str | None, keep_mask: bool):
        self.device = device
        self.keep_mask = keep_mask
        self.layers: list[LayerQKV] = []

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if self.device is not None:
            tensor = tensor.to(self.device)
        # A clone, so later in-place work (or a cache's buffers) cannot change the record.
        return tensor.clone()

    def record(self, module, query, key, value, attention_mask, scaling) -> None:
        layer_idx = getattr(module, "layer_idx", None)
        self.layers.append(
            LayerQKV(
                layer_idx=len(self.layers) if layer_idx is None else int(layer_idx),
                queries=self._store(query),
                keys=self._store(key),
                values=self._store(value),
                scaling=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
                attention_mask=(
                    self._store(attention_mask)
                    if self.keep_mask and isinstance(attention_mask, torch.Tensor)
                    else None
                ),
            )
        )


_ACTIVE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("kvarn_capture", default=None)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.record(module, query, key, value, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register_capture_attention() -> None:
    """Register ``"kvarn_capture"`` with transformers (idempotent); masks are built as for SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def record_attention(
    model, device: torch.device | str | None = "cpu", keep_mask: bool = False
) -> Iterator[list[LayerQKV]]:
    """Record every attention call of ``model`` inside the ``with`` block.

    Yields the list that fills with one ``LayerQKV`` per attention call, in call order (one per
    layer per forward pass). ``device`` is where records are kept (None: where they were computed).
    """
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    register_capture_attention()
    previous = model.config._attn_implementation
    recorder = _Recorder(device, keep_mask)
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    if model.config._attn_implementation != CAPTURE_IMPLEMENTATION:
        model.set_attn_implementation(previous)
        raise TypeError(
            f"{type(model).__name__} cannot switch its attention implementation "
            "(it does not use transformers' AttentionInterface)"
        )
    token = _ACTIVE.set(recorder)
    try:
        yield recorder.layers
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)


@torch.no_grad()
def capture_qkv(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str | None = "cpu",
) -> list[LayerQKV]:
    """One forward pass without a KV cache; per layer, the post-RoPE Q, K, V attention received.

    Without a cache the keys and values are exactly the ``T`` tokens of ``input_ids`` (with one,
    they would be the whole cache). Returns one ``LayerQKV`` per attention layer, in layer order.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be a [batch, tokens] tensor, got {getattr(input_ids, 'shape', type(input_ids))}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens")
    model_device = next(model.parameters()).device
    with record_attention(model, device=device, keep_mask=attention_mask is not None) as layers:
        model(
            input_ids=input_ids.to(model_device),
            attention_mask=None if attention_mask is None else attention_mask.to(model_device),
            use_cache=False,
        )
    return sorted(layers, key=lambda layer: layer.layer_idx)


def real_text_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """``[1, n_tokens]`` token ids of real, deterministic text: standard-library sources of this Python.

    The text is the ``stdlib-code`` corpus of ``kvarn.eval.corpus`` (argparse.py, difflib.py, ...
    concatenated in a fixed order); it ships with every interpreter, so no download is needed.
    """
    from kvarn.eval.corpus import corpus_tokens

    return corpus_tokens(tokenizer, int(n_tokens), corpus="stdlib-code").input_ids
