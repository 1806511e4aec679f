"""Hand-off from ``KVarNLayer.update`` to the registered "kvarn" attention function.

transformers calls ``past_key_values.update(k, v, layer_idx)`` and then, separately, the attention
function with the tensors ``update`` returned; only the attention function sees the padding mask.
So ``update`` only stashes the new tokens, publishes "these key states belong to this layer" here,
and the attention function claims it by identity of the key tensor it receives. Identity (not
equality) makes the match exact: a sliding-window layer, another cache, or another model never
hands over the same tensor object. Thread-local, so concurrent generations in threads don't mix.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_local = threading.local()


def publish(key_states: torch.Tensor, layer: Any) -> None:
    """Record that ``key_states`` (as returned by ``layer.update``) belong to ``layer``."""
    _local.pending = (key_states, layer)


def claim(key_states: torch.Tensor) -> Any | None:
    """The layer whose ``update`` returned exactly ``key_states``, or None (not a KVarN layer)."""
    pending = getattr(_local, "pending", None)
    if pending is None or pending[0] is not key_states:
        return None
    _local.pending = None
    return pending[1]


def clear() -> None:
    _local.pending = None
