"""transformers' QuantizedCache (optimum-quanto) as the eval method ``hf_quanto``, on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, QuantizedCache

from kvarn.config import KVarNConfig
from kvarn.eval.common import (
    EvalInputError,
    chunk_bounds,
    forward_chunk,
    greedy_generate,
    greedy_generate_methods,
    load_model_for_eval,
    parse_methods,
    prefilled_cache,
)
from kvarn.eval.hf_quantized import HFQuantoMethod, forward_like_decoding
from kvarn.eval.simulated_cache import exact_layers
from tests.test_eval_support import tiny_model_dir  # noqa: F401  (fixture)

pytest.importorskip("optimum.quanto")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):  # noqa: F811
    return load_model_for_eval(str(tiny_model_dir))


def prompt(length: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def test_parse_names_and_presets():
    methods = parse_methods("none,hf_quanto,hf_quanto:k2v2,HF_QUANTO:k4v4,kvarn:k4v2")
    assert [m.name for m in methods] == ["none", "hf_quanto:k4v4", "hf_quanto:k2v2", "kvarn:k4v2"]
    assert isinstance(methods[1], HFQuantoMethod) and methods[1].nbits == 4 and methods[2].nbits == 2
    assert not any(isinstance(m, HFQuantoMethod) for m in parse_methods("all:k2v2"))
    with pytest.raises(EvalInputError, match="same bits.*hf_quanto:k4v4, hf_quanto:k2v2"):
        parse_methods("hf_quanto:k4v2")
    assert HFQuantoMethod().group_size(64) == 64 and HFQuantoMethod().group_size(128) == 64
    assert HFQuantoMethod().group_size(80) == 40 and HFQuantoMethod().group_size(16) == 16


def test_missing_optimum_quanto_is_a_clear_error(monkeypatch):
    import transformers.cache_utils

    monkeypatch.setattr(transformers.cache_utils, "is_optimum_quanto_available", lambda: False)
    with pytest.raises(EvalInputError, match=r"hf_quanto:k2v2.*optimum-quanto.*pip install optimum-quanto"):
        parse_methods("none,hf_quanto:k2v2")


def test_quantizer_is_per_token_min_max_rtn():
    """What docs/eval.md says it stores: per token and head, asymmetric min-max, 2^bits levels."""
    from transformers.cache_utils import QuantoQuantizedLayer

    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 64) * torch.linspace(0.1, 8, 64)  # channel outliers
    for bits in (2, 4):
        layer = QuantoQuantizedLayer(nbits=bits, q_group_size=64)
        theirs = layer._dequantize(layer._quantize(x.contiguous(), axis=0))
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        step = (hi - lo) / (2**bits - 1)
        ours = torch.round((x - lo) / step).clamp(0, 2**bits - 1) * step + lo
        # Same grid; a value exactly between two levels may round either way (float rounding).
        off = (theirs - ours).abs() > 1e-4 * step
        assert off.float().mean() < 1e-3 and ((theirs - ours).abs() <= step * 1.0001).all()
        again = layer._dequantize(layer._quantize(theirs.contiguous(), axis=0))
        # Re-quantizing at a flush keeps every code: the levels move by float rounding only.
        assert ((again - theirs).abs() <= 1e-5 * step).all()


def token_by_token(model, ids: torch.Tensor, cache, start: int = 0) -> torch.Tensor:
    """The slow twin: one forward per token."""
    return torch.cat([forward_chunk(model, ids[:, i : i + 1], cache) for i in range(start, ids.shape[1])])


@pytest.mark.parametrize("bits", [2, 4])
def test_teacher_forcing_in_chunks_matches_token_by_token_decoding(loaded, bits):
    model = loaded.model
    method = HFQuantoMethod(nbits=bits, residual_length=24)  # several flushes within the text
    ids = prompt(150, bits, model.config.vocab_size)
    prefix = 20  # the prefill (first update) quantizes the whole prefix at once
    slow_cache = method.new_cache(model.config)
    slow = torch.cat(
        [forward_chunk(model, ids[:, :prefix], slow_cache), token_by_token(model, ids, slow_cache, prefix)]
    )
    fast_cache = method.new_cache(model.config)
    fast = torch.cat(
        [
            forward_like_decoding(model, ids[:, s:e], fast_cache)
            for s, e in [(0, prefix), *chunk_bounds(prefix, 150, 32)]
        ]
    )
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    # Plain chunks do not behave like decoding (the check above has teeth).
    naive_cache = method.new_cache(model.config)
    naive = torch.cat(
        [
            forward_chunk(model, ids[:, s:e], naive_cache)
            for s, e in [(0, prefix), *chunk_bounds(prefix, 150, 32)]
        ]
    )
    assert (naive - slow).abs().max() > 100 * (fast - slow).abs().max()
    # And quantization does something at all.
    exact = forward_chunk(model, ids, DynamicCache())
    assert (slow - exact).abs().max() > 1e-2


def test_prefilled_cache_matches_a_prefill_through_the_cache(loaded):
    model = loaded.model
    method = HFQuantoMethod(nbits=2, residual_length=16)
    ids = prompt(90, 7, model.config.vocab_size)
    dense = DynamicCache()
    forward_chunk(model, ids[:, :50], dense)
    copied = prefilled_cache(method, exact_layers(dense), model.config)
    through = method.new_cache(model.config)
    forward_chunk(model, ids[:, :50], through)
    assert isinstance(copied, QuantizedCache)
    torch.testing.assert_close(
        forward_like_decoding(model, ids[:, 50:], copied), token_by_token(model, ids[:, :90], through, 50)
    )


def test_generation_rows_match_generate_with_quantized_cache(loaded):
    model = loaded.model
    ids = prompt(45, 3, model.config.vocab_size)
    hf2, hf4 = HFQuantoMethod(nbits=2, residual_length=16), HFQuantoMethod(nbits=4, residual_length=16)
    methods = [
        KVarNConfig(method="none", tile_size=32),
        hf2,
        KVarNConfig.parse("kivi:k2v2", tile_size=32),
        hf4,
    ]
    rows = greedy_generate_methods(model, ids, methods, 40, set(), rows_per_batch=2)
    for method in (hf2, hf4):
        single = greedy_generate(model, ids, method.new_cache(model.config), 40, set())
        assert rows[methods.index(method)] == single, method.name
        generated = model.generate(
            ids, past_key_values=method.new_cache(model.config), max_new_tokens=40, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        assert single == generated[0, 45:].tolist()
    assert rows[0] == greedy_generate(model, ids, DynamicCache(), 40, set())
    assert rows[1] != rows[0], "2-bit quantization changed nothing: the test would prove nothing"


def test_accumulation_rejects_hf_quanto_naming_why(loaded, tmp_path):
    from kvarn.eval.accumulation import run_accumulation

    with pytest.raises(EvalInputError, match="accumulation suite cannot run hf_quanto:k4v4.*shadow"):
        run_accumulation(loaded, parse_methods("kvarn:k2v2,hf_quanto"), 64, tmp_path)
