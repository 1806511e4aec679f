"""The next-token choice of GraphDecoder (kvarn.integrations.sampling), against transformers.

``filter_logits`` must return, to the bit, what transformers' logits warpers return for the same
float32 logits (so the draw is from the distribution ``model.generate(do_sample=True)`` samples
from), and ``sample_next`` must draw from its softmax: checked with the same exponential noise
drawn by hand, and by frequencies over many draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import kvarn
from kvarn.integrations.sampling import SamplingConfig, filter_logits, sample_next
from tests.test_cache_common import one_torch_thread, tiny_model  # noqa: F401

VOCAB = 40


def warped(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """transformers' warpers in generate's order, on the float32 logits generate's ``_sample``
    hands them (``GenerationMixin._get_logits_processor`` with ``min_tokens_to_keep=1``)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers(None, logits.float())


def _logits(kind: str, batch: int = 3, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(["normal", "ties", "flat", "peaked"].index(kind))
    if kind == "normal":
        x = torch.randn(batch, VOCAB, generator=gen) * 2
    elif kind == "ties":  # few distinct values: ties at every threshold
        x = torch.randint(-3, 3, (batch, VOCAB), generator=gen).float()
    elif kind == "flat":
        x = torch.zeros(batch, VOCAB)
    elif kind == "peaked":  # one token with all the probability (the rest underflow to 0)
        x = torch.randn(batch, VOCAB, generator=gen)
        x[:, 7] = 120.0
    else:
        raise AssertionError(kind)
    return x.to(dtype)


CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.6, top_k=20, top_p=0.95),  # a reasoning model's settings
    dict(temperature=1.3, top_k=5),
    dict(top_k=1000),  # top_k beyond the vocabulary keeps everything
    dict(top_k=VOCAB),
    dict(top_p=1.0),  # no top-p filter
    dict(top_p=0.5),
    dict(top_p=1e-6),  # only the most probable token (or the tied ones sort puts last)
    dict(temperature=0.7, min_p=0.1),
    dict(temperature=0.9, top_k=30, top_p=0.8, min_p=0.05),
    dict(min_p=1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties", "flat", "peaked"])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_filter_is_transformers_warpers(options, kind, dtype):
    logits = _logits(kind, dtype=dtype)
    got = filter_logits(logits, SamplingConfig(do_sample=True, **options))
    expected = warped(logits, **options)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected), (got, expected)
    assert bool((got > -math.inf).any(dim=-1).all())  # every row keeps a token


@pytest.mark.parametrize("kind", ["normal", "ties", "peaked"])
@pytest.mark.parametrize("options", CONFIGS[:3] + CONFIGS[8:10], ids=str)
def test_draw_is_argmax_of_probs_over_exponential_noise(options, kind):
    """The same exponential noise, drawn by hand from a generator in the same state, over the
    softmax of transformers' warped logits: the same tokens."""
    logits = _logits(kind, batch=64)
    got = sample_next(logits, SamplingConfig(do_sample=True, **options), torch.Generator().manual_seed(5))
    probs = warped(logits, **options).softmax(-1)
    noise = torch.empty(probs.shape).exponential_(generator=torch.Generator().manual_seed(5))
    expected = (probs / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(-1)
    assert got.dtype == torch.long and got.shape == (64,)
    assert torch.equal(got, expected)
    assert bool((probs.gather(1, got[:, None]) > 0).all())  # never a filtered token


def test_greedy_and_top_k_1_are_argmax():
    logits = _logits("ties", dtype=torch.bfloat16)
    for config in (SamplingConfig(), SamplingConfig(do_sample=True, top_k=1, temperature=0.3, top_p=0.5)):
        assert config.greedy
        assert torch.equal(sample_next(logits, config), logits.argmax(-1))
    # do_sample=False ignores the sampling options (as generate does), even a zero temperature
    assert SamplingConfig(do_sample=False, temperature=0.0, top_k=5).greedy


def test_draw_frequencies_follow_the_filtered_softmax():
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 3.1, 0.0, -2.5, 1.0])
    config = SamplingConfig(do_sample=True, temperature=0.8, top_k=7, top_p=0.9)
    expected = filter_logits(logits[None], config).softmax(-1)[0]
    assert 3 <= int((expected > 0).sum()) < 7  # both filters removed something
    draws = 200_000
    tokens = sample_next(logits.expand(draws, -1), config, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=logits.numel()).double() / draws
    assert bool((freq[expected == 0] == 0).all()), "a filtered token was drawn"
    sigma = (expected.double() * (1 - expected.double()) / draws).sqrt()
    assert bool(((freq - expected.double()).abs() <= 5 * sigma + 1e-12).all()), (freq, expected)


def test_rows_draw_independently_of_each_other():
    """Row r's token depends on row r's logits and the generator state only."""
    logits = _logits("normal", batch=4)
    config = SamplingConfig(do_sample=True, top_p=0.9)
    both = sample_next(logits, config, torch.Generator().manual_seed(3))
    changed = logits.clone()
    changed[1] = torch.randn(VOCAB)
    again = sample_next(changed, config, torch.Generator().manual_seed(3))
    assert torch.equal(both[[0, 2, 3]], again[[0, 2, 3]])
    many = logits[:1].expand(256, -1)
    seed_3 = sample_next(many, config, torch.Generator().manual_seed(3))
    assert not torch.equal(seed_3, sample_next(many, config, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize(
    "options",
    [dict(temperature=0.6, top_k=20, top_p=0.95), dict(temperature=1.2, top_k=0, min_p=0.2)],
    ids=str,
)
def test_filter_is_what_generate_samples_from(options):
    """transformers' own pipeline: ``model.generate(do_sample=True, output_logits=True,
    output_scores=True)`` returns each step's raw logits and the scores it sampled from
    (``top_k=0`` is generate's "off", ``None`` here; generate's default is 50)."""
    model = kvarn.enable(tiny_model("llama"))
    ids = torch.randint(2, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model.generate(
        ids, do_sample=True, max_new_tokens=6, output_logits=True, output_scores=True,
        return_dict_in_generate=True, generation_config=GenerationConfig(pad_token_id=0), **options,
    )  # fmt: skip
    ours = SamplingConfig(
        do_sample=True, **{k: (v or None) if k == "top_k" else v for k, v in options.items()}
    )
    for logits, scores in zip(out.logits, out.scores, strict=True):
        assert torch.equal(filter_logits(logits, ours), scores)


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, temperature=math.nan), "temperature"),
        (dict(do_sample=True, temperature=math.inf), "temperature"),
        (dict(do_sample=True, temperature="hot"), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.01), "min_p"),
        (dict(do_sample="yes"), "do_sample"),
    ],
    ids=str,
)
def test_bad_options_name_the_argument(options, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        SamplingConfig(**options)
