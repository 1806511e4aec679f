"""A registered attention function that lets an evaluation watch (and replace) every layer's attention output.

It is the model's own sdpa attention (``transformers.integrations.sdpa_attention``), followed by a
call to the innermost active hook: ``hook(module, query, key, value, attention_mask, output, kwargs)``
returns the output the model continues with. Hooks see the attention output before ``o_proj``
(``[batch, q_len, heads, head_dim]``), the query after RoPE and the keys/values the cache returned.

Why an attention function rather than forward hooks on the attention modules: the static regime
must re-run attention on other keys/values with the same query, mask and scaling, which only the
attention function receives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "kvarn_eval_recording"

Hook = Callable[..., torch.Tensor]
_HOOKS: list[Hook] = []


def recording_attention(module, query, key, value, attention_mask, **kwargs):
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if _HOOKS:
        output = _HOOKS[-1](module, query, key, value, attention_mask, output, kwargs)
    return output, weights


def sdpa(module, query, key, value, attention_mask, kwargs) -> torch.Tensor:
    """The model's sdpa attention on other keys/values (same mask and scaling); ``[b, q, heads, d]``."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, recording_attention)
    # Same masks as sdpa (boolean 4D, or None where is_causal suffices).
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def recording(model, hook: Hook) -> Iterator[None]:
    """Run ``model`` with :func:`recording_attention` and ``hook`` active; restores the previous attention."""
    _register()
    previous = model.config._attn_implementation
    if previous != "sdpa":
        raise RuntimeError(
            f"the recording attention wraps sdpa; the model uses {previous!r} (load it with attn_implementation='sdpa')"
        )
    model.set_attn_implementation(ATTENTION_NAME)
    _HOOKS.append(hook)
    try:
        yield
    finally:
        _HOOKS.pop()
        model.set_attn_implementation(previous)
