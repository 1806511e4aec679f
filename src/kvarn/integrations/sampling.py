"""Next-token choice for :class:`kvarn.integrations.cuda_graph.GraphDecoder`: greedy, or a draw from
the distribution that ``model.generate(do_sample=True, ...)`` samples from, with fixed shapes and
no host synchronization, so that it can be part of a recorded CUDA graph.

The logits are processed as transformers' logits warpers process them (``generation/
logits_process.py``, in the order ``GenerationMixin._get_logits_processor`` applies them, with
``min_tokens_to_keep=1`` as in non-beam sampling): float32 logits (``_sample`` casts them),
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``;
filtered tokens get ``-inf``. The draw is ``argmax(probs / E)`` with ``E ~ Exponential(1)`` i.i.d.
per token: ``P(argmax = j) = p_j``, the distribution ``torch.multinomial(probs, 1)`` draws from,
without multinomial's host-side checks, and a filtered token (``p = 0``) is never chosen.

One difference: ``top_k=1`` returns ``argmax`` (the lowest index among tied maxima, as greedy
does), where transformers keeps every tied maximum and draws among them uniformly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

import torch

FILTER_VALUE = -math.inf  # transformers' default ``filter_value``


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``do_sample=False`` (default) is greedy and ignores the
    other options; ``None`` (or ``top_p=1``) switches an option off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if self.do_sample and not (_is_real(self.temperature) and 0 < self.temperature < math.inf):
            raise ValueError(
                f"temperature must be a finite number > 0 when do_sample=True, got {self.temperature!r} "
                "(for greedy decoding use do_sample=False)"
            )
        if self.top_k is not None and not (
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1
        ):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not (_is_real(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be None or a number in [0, 1], got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        """Whether the choice is ``argmax`` of the logits (no draw, no random numbers)."""
        return not self.do_sample or self.top_k == 1


class SamplingOptions(TypedDict, total=False):
    """The keyword options of ``GraphDecoder.generate`` / ``start`` / ``resume`` (and
    ``graph_generate``): :class:`SamplingConfig`'s fields and the generator of the draw."""

    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    generator: torch.Generator | None


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """``[B, V]`` logits -> float32 scores after temperature, top-k, top-p and min-p, the filtered
    tokens at ``-inf``: what transformers' warpers return for the same logits (same ops, so ties
    at a threshold are kept or removed as they are there). Every op has a fixed output shape and
    none reads device data on the host."""
    scores = logits.float()
    vocab = scores.shape[-1]
    if config.temperature != 1.0:  # generate adds no temperature warper at 1.0
        scores = scores / config.temperature
    if config.top_k is not None and config.top_k < vocab:  # top_k >= V keeps everything
        kth = torch.topk(scores, config.top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, FILTER_VALUE)
    if config.top_p is not None and config.top_p < 1.0:  # generate adds no top-p warper at 1.0
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1 - config.top_p)
        sorted_remove[..., -1:].fill_(False)  # keep the most probable token (a scalar fill: no upload)
        remove = sorted_remove.scatter(1, order, sorted_remove)
        scores = scores.masked_fill(remove, FILTER_VALUE)
    if config.min_p is not None:
        probs = scores.softmax(dim=-1)
        remove = probs < config.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        scores = scores.masked_fill(remove, FILTER_VALUE)
    return scores


def sample_next(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row, ``[B]`` int64, from ``[B, V]`` logits.

    Greedy (``config.greedy``): ``logits.argmax(-1)``, nothing else. Sampling: the filtered
    distribution (:func:`filter_logits`) drawn from with exponential noise from ``generator``
    (``None``: torch's default generator of the logits' device). The noise is one
    ``exponential_`` over a ``[B, V]`` float32 tensor, so two runs from generators in the same
    state draw the same tokens, and each row's noise does not depend on the other rows' logits.
    """
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, config).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    # exponential_ may return 0 (an underflowed draw); a tiny floor keeps p / E finite and a
    # filtered token's 0 / E at 0 rather than NaN (which argmax would prefer).
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)
