"""Greedy decoding helpers against their slow twins, and the recording attention against plain sdpa."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from kvarn.config import KVarNConfig
from kvarn.eval.common import (
    chunk_bounds,
    forward_chunk,
    greedy_generate,
    greedy_generate_methods,
    load_model_for_eval,
)
from kvarn.eval.recording import recording
from kvarn.eval.simulated_cache import SimulatedQuantizedCache
from tests.test_eval_support import tiny_model_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):  # noqa: F811
    return load_model_for_eval(str(tiny_model_dir))


def prompt(length: int, seed: int, vocab: int) -> torch.Tensor:
    # Ids from 1: id 0 is the pad token, which generate() would mask.
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def test_greedy_generate_matches_transformers_generate(loaded):
    ids = prompt(50, 0, loaded.model.config.vocab_size)
    ours = greedy_generate(loaded.model, ids, DynamicCache(), 40, set())
    theirs = loaded.model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, 50:].tolist()


def test_greedy_generate_stops_at_eos_and_at_stop_condition(loaded):
    ids = prompt(20, 1, loaded.model.config.vocab_size)
    full = greedy_generate(loaded.model, ids, DynamicCache(), 30, set())
    eos = full[5]
    cut = greedy_generate(loaded.model, ids, DynamicCache(), 30, {eos})
    assert cut == full[: full.index(eos)]
    stopped = greedy_generate(loaded.model, ids, DynamicCache(), 30, set(), should_stop=lambda g: len(g) == 7)
    assert stopped == full[:7]


@pytest.mark.parametrize("prompt_length", [31, 64, 77])
def test_batched_methods_decode_like_separate_runs(loaded, prompt_length):
    configs = [
        KVarNConfig(method="none", tile_size=32),
        *[
            KVarNConfig.parse(s, tile_size=32)
            for s in ("kvarn:k2v2", "kivi:k2v2", "fp8_e4m3", "per_token_rtn:k4v2")
        ],
        KVarNConfig.parse("kivi:k2v2", tile_size=32, keep_sink_tile=False),
    ]
    ids = prompt(prompt_length, prompt_length, loaded.model.config.vocab_size)
    stop = lambda g: len(g) >= 3 and g[-1] == g[-3]  # noqa: E731  (a row-specific early stop)
    batched = greedy_generate_methods(
        loaded.model, ids, configs, 45, set(), should_stop=stop, rows_per_batch=4
    )
    for config, tokens in zip(configs, batched, strict=True):
        single = greedy_generate(
            loaded.model, ids, SimulatedQuantizedCache(config), 45, set(), should_stop=stop
        )
        assert tokens == single, config.name
    assert batched[0] == greedy_generate(loaded.model, ids, DynamicCache(), 45, set(), should_stop=stop)
    assert len({tuple(t) for t in batched}) > 1, "quantization changed nothing: the test would prove nothing"


def test_chunked_teacher_forcing_matches_one_pass(loaded):
    ids = prompt(150, 3, loaded.model.config.vocab_size)
    whole = forward_chunk(loaded.model, ids, DynamicCache())
    cache = DynamicCache()
    parts = [forward_chunk(loaded.model, ids[:, s:e], cache) for s, e in chunk_bounds(0, 150, 32)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-4, atol=1e-4)
    assert list(chunk_bounds(10, 75, 32)) == [(10, 32), (32, 64), (64, 75)]


def test_recording_attention_is_sdpa_and_restores_the_model(loaded):
    model = loaded.model
    ids = prompt(40, 4, model.config.vocab_size)
    plain = forward_chunk(model, ids, DynamicCache())
    seen = []

    def hook(module, query, key, value, mask, output, kwargs):
        seen.append((module.layer_idx, tuple(output.shape)))
        return output

    with recording(model, hook):
        recorded = forward_chunk(model, ids, DynamicCache())
    assert torch.equal(plain, recorded)
    heads, dim = (
        model.config.num_attention_heads,
        model.config.hidden_size // model.config.num_attention_heads,
    )
    assert seen == [(i, (1, 40, heads, dim)) for i in range(model.config.num_hidden_layers)]
    assert model.config._attn_implementation == "sdpa"

    with recording(model, lambda m, q, k, v, mask, out, kw: torch.zeros_like(out)):
        zeroed = forward_chunk(model, ids, DynamicCache())
    assert not torch.allclose(zeroed, plain)  # the hook's output is what the model continues with
