"""``model.generate`` routed through GraphDecoder (kvarn.integrations.fast_generate), on CPU.

The graph path is forced on CPU (``on_cpu=True``: GraphDecoder's eager twin of the recorded
step); its tokens must equal the unpatched ``model.generate`` token for token, and every option
GraphDecoder does not implement must leave the call to the original ``generate``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import kvarn
from kvarn.integrations import fast_generate
from tests.test_cache_common import one_torch_thread, tiny_model  # noqa: F401
from tests.test_cuda_graph_decode import TILE, _prompts


def _cache(model):
    return kvarn.KVarNCache(config=model.config, quant="k4v2", tile_size=TILE)


def _generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, past_key_values=_cache(model), **kwargs)


def _graph_generate(model, ids, mask, **kwargs):
    with kvarn.graph_generation(model, on_cpu=True):
        out = _generate(model, ids, mask, **kwargs)
    return out, kvarn.last_generate_path(model)


@pytest.mark.parametrize(
    "arch, length, pads", [("llama", 70, [0, 5, 17]), ("qwen3", 40, [0, 20])]
)  # qwen3 row 1: its sink fills during decoding
@pytest.mark.parametrize("length_option", ["max_new_tokens", "max_length"])
def test_greedy_generate_takes_the_graph_path_and_matches(arch, length, pads, length_option):
    model = kvarn.enable(tiny_model(arch))
    ids, mask = _prompts(len(pads), length, pads)
    new = TILE + 7
    options = {"max_new_tokens": new} if length_option == "max_new_tokens" else {"max_length": length + new}
    expected = _generate(model, ids, mask, **options)
    got, path = _graph_generate(model, ids, mask, **options)
    assert path.use_graph, path.reason
    assert path.stats.eager_steps + path.stats.replays == new and path.stats.replays > 0
    assert torch.equal(got, expected)
    assert "generate" not in model.__dict__  # restored


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_stop_tokens_and_padding_like_generate(arch):
    model = kvarn.enable(tiny_model(arch, seed=3))
    ids, mask = _prompts(3, 44, [0, 4, 9], seed=3)
    free = _generate(model, ids, mask, max_new_tokens=40)
    stop = int(free[0, 44 + 5])  # a stop token row 0 produces early on (data, not a constant)
    for options in [dict(eos_token_id=stop), dict(eos_token_id=[stop, 3], pad_token_id=1)]:
        expected = _generate(model, ids, mask, max_new_tokens=40, **options)
        got, path = _graph_generate(model, ids, mask, max_new_tokens=40, **options)
        assert path.use_graph, path.reason
        assert torch.equal(got, expected)


# The test leaves the length to the model's defaults on purpose; transformers warns about that.
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")
def test_model_generation_config_defaults_are_honoured():
    """eos from model.generation_config, max_length's default of 20 new tokens, no mask passed
    (inferred from pad_token_id as generate does)."""
    model = kvarn.enable(tiny_model("llama", seed=3))
    ids, mask = _prompts(3, 44, [0, 4, 9], seed=3)
    stop = int(_generate(model, ids, mask, max_new_tokens=12)[1, 44 + 3])
    model.generation_config.eos_token_id = stop
    expected = model.generate(ids, past_key_values=_cache(model))
    with kvarn.graph_generation(model, on_cpu=True):
        got = model.generate(ids, past_key_values=_cache(model))
    path = kvarn.last_generate_path(model)
    assert path.use_graph, path.reason
    assert "20 new tokens" in path.reason
    assert torch.equal(got, expected)


def test_top_k_1_sampling_is_greedy_and_top_p_is_reproducible():
    model = kvarn.enable(tiny_model("qwen3"))
    ids, mask = _prompts(2, 40, [0, 20])
    greedy = _generate(model, ids, mask, max_new_tokens=TILE + 5)
    got, path = _graph_generate(model, ids, mask, max_new_tokens=TILE + 5, do_sample=True, top_k=1)
    assert path.use_graph and path.reason.startswith("sampled")
    assert torch.equal(got, greedy)
    runs = []
    for seed in (7, 7, 8):
        with kvarn.graph_generation(model, on_cpu=True, generator=torch.Generator().manual_seed(seed)):
            runs.append(_generate(model, ids, mask, max_new_tokens=TILE + 5, do_sample=True, top_p=0.9))
        assert kvarn.last_generate_path(model).use_graph
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][:, 40:], runs[2][:, 40:])
    assert not torch.equal(runs[0], greedy)


def test_sampling_resolves_transformers_defaults(monkeypatch):
    """do_sample with nothing else: top_k=50 (transformers' default), no top-p, temperature 1;
    the model's generation config (e.g. Qwen3's) fills what the call does not give."""
    model = kvarn.enable(tiny_model("llama"))
    ids, mask = _prompts(2, 40, [0, 3])
    seen = []
    monkeypatch.setattr(
        fast_generate,
        "_sampling",
        lambda config, f=fast_generate._sampling: seen.append(f(config)) or seen[-1],
    )
    with kvarn.graph_generation(model, on_cpu=True):
        _generate(model, ids, mask, max_new_tokens=2, do_sample=True)
        model.generation_config.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.95)
        _generate(model, ids, mask, max_new_tokens=2)
        _generate(model, ids, mask, max_new_tokens=2, top_k=0, min_p=0.1)
        _generate(model, ids, mask, max_new_tokens=2, do_sample=False)
    assert seen == [
        dict(do_sample=True, temperature=1.0, top_k=50, top_p=None, min_p=None),
        dict(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, min_p=None),
        dict(do_sample=True, temperature=0.6, top_k=None, top_p=0.95, min_p=0.1),
        {},
    ]


class _Streamer(BaseStreamer):
    def __init__(self):
        self.puts = 0

    def put(self, value):
        self.puts += 1

    def end(self):
        pass


FALLBACKS = [
    (dict(num_beams=2), "num_beams=2"),
    (dict(repetition_penalty=1.3), "repetition_penalty=1.3"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size=2"),
    (dict(min_new_tokens=3), "min_new_tokens=3"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores=True"),
    (dict(return_dict_in_generate=True), "return_dict_in_generate=True"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3"),
    (dict(do_sample=True, typical_p=0.5, top_k=1), "typical_p=0.5"),
    (dict(streamer="streamer"), "streamer"),
    (dict(logits_processor="processor"), "logits_processor"),
    (dict(past_key_values="dynamic"), "DynamicCache"),
    (dict(past_key_values=None), "no past_key_values"),
]


def _fresh(model, options: dict) -> dict:
    """The options with a fresh cache (and a fresh streamer / processor) for one call."""
    options = {"past_key_values": _cache(model), **options}
    if options["past_key_values"] == "dynamic":
        options["past_key_values"] = DynamicCache(config=model.config)
    if options.get("streamer") == "streamer":
        options["streamer"] = _Streamer()
    if options.get("logits_processor") == "processor":
        options["logits_processor"] = LogitsProcessorList([lambda ids, scores: scores])
    return options


@pytest.mark.parametrize("options, reason", FALLBACKS, ids=[reason for _, reason in FALLBACKS])
def test_each_unsupported_option_falls_back_to_the_original(options, reason):
    model = kvarn.enable(tiny_model("llama"))
    ids, mask = _prompts(2, 40, [0, 3])
    if "prompt_lookup_num_tokens" in options:  # assisted decoding: one row only
        ids, mask = ids[:1], mask[:1]
    torch.manual_seed(0)  # typical_p samples (through transformers, the global generator)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, **_fresh(model, options))
    torch.manual_seed(0)
    call = _fresh(model, options)
    with kvarn.graph_generation(model, on_cpu=True):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5, **call)
    path = kvarn.last_generate_path(model)
    assert not path.use_graph and reason in path.reason, path
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
    else:
        assert torch.equal(got.sequences, expected.sequences)
    if "streamer" in call:
        assert call["streamer"].puts > 1  # the original streamed


def test_a_non_empty_cache_falls_back():
    model = kvarn.enable(tiny_model("llama"))
    ids, mask = _prompts(2, 40, [0, 3])
    more = torch.cat([ids, torch.full((2, 1), 5)], dim=1)
    more_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    outs = []
    for patched in (False, True):
        cache = _cache(model)
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
        with kvarn.graph_generation(model, on_cpu=True) if patched else contextlib.nullcontext():
            outs.append(
                model.generate(more, attention_mask=more_mask, past_key_values=cache, max_new_tokens=4)
            )
    path = kvarn.last_generate_path(model)
    assert not path.use_graph and "non-empty" in path.reason
    assert torch.equal(outs[0], outs[1])


def test_fallback_on_cpu_unless_forced_and_without_kvarn_attention():
    model = kvarn.enable(tiny_model("llama"))
    ids, mask = _prompts(2, 40, [0, 3])
    expected = _generate(model, ids, mask, max_new_tokens=4)
    with kvarn.graph_generation(model):
        assert torch.equal(_generate(model, ids, mask, max_new_tokens=4), expected)
    path = kvarn.last_generate_path(model)
    assert not path.use_graph and "on_cpu=True" in path.reason
    plain = tiny_model("llama")  # sdpa attention
    use, reason = kvarn.decide_generate_path(
        plain, ids, attention_mask=mask, past_key_values=_cache(plain), on_cpu=True
    )
    assert not use and "kvarn.enable" in reason
    gemma = kvarn.enable(tiny_model("gemma3"))
    use, reason = kvarn.decide_generate_path(
        gemma, ids, attention_mask=mask, past_key_values=kvarn.KVarNCache(config=gemma.config), on_cpu=True
    )
    assert not use and "DynamicSlidingWindowLayer" in reason


def test_decision_function_on_its_own(monkeypatch):
    model = kvarn.enable(tiny_model("llama"))
    ids, mask = _prompts(2, 40, [0, 3])
    decide = kvarn.decide_generate_path

    def ok(**kwargs):
        return decide(model, ids, **{"attention_mask": mask, "past_key_values": _cache(model), **kwargs})

    assert ok(on_cpu=True, max_new_tokens=3) == (True, "greedy, 3 new tokens, every option supported")
    right = mask.clone()
    right[1, -1] = 0
    for kwargs, reason in [
        (dict(attention_mask=right), "right padding"),
        (dict(max_length=40), "max_length=40 leaves no new token"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(eos_token_id=-1), "eos_token_id=-1"),
        (dict(assistant_model=model), "assistant_model"),
        (dict(stopping_criteria=[object()]), "stopping_criteria"),
        (dict(stop_strings=["x"]), "stop_strings"),
        (dict(max_time=1.0), "max_time"),
        (dict(use_cache=False), "use_cache=False"),
        (dict(position_ids=ids), "position_ids"),
        (dict(cache_implementation="static"), "cache_implementation"),
    ]:
        use, why = ok(on_cpu=True, **kwargs)
        assert not use and reason in why, (kwargs, why)
    use, why = decide(model, ids.float(), past_key_values=_cache(model), on_cpu=True)
    assert not use and "int64" in why
    use, why = decide(model, ids[0], past_key_values=_cache(model), on_cpu=True)
    assert not use and "2-D" in why
    assert ok(on_cpu=True, logits_processor=LogitsProcessorList())[0]  # empty lists add nothing
    assert ok(on_cpu=True, token_type_ids=None, streamer=None)[0]  # None: as if not given
    # CUDA-only conditions, with the device checks mocked (no GPU here)
    monkeypatch.setattr(fast_generate, "_check_device", _fake_cuda)
    monkeypatch.setattr(
        fast_generate.cuda_graph, "kernel_unsupported_reason", lambda *a: "no Triton (mocked)"
    )
    assert ok() == (False, "no Triton (mocked)")
    monkeypatch.setattr(fast_generate.cuda_graph, "kernel_unsupported_reason", lambda *a: None)
    assert ok()[0]
    monkeypatch.delattr(torch.cuda.CUDAGraph, "register_generator_state", raising=False)
    gen = torch.Generator()
    use, why = ok(do_sample=True, top_p=0.9, generator=gen)
    assert not use and "register_generator_state" in why
    assert ok(do_sample=True, top_k=1, generator=gen)[0]  # greedy draws nothing


def _fake_cuda(model, plan, on_cpu, generator):
    """_check_device as on a CUDA device (the CUDA branch's own checks run for real)."""
    reason = fast_generate._cuda_unsupported_reason(model, plan, generator)
    if reason is not None:
        raise fast_generate._Fallback(reason)


def test_context_manager_restores_generate_also_after_errors_and_nests():
    model = kvarn.enable(tiny_model("llama"))
    original = model.generate
    with pytest.raises(RuntimeError, match="boom"):
        with kvarn.graph_generation(model, on_cpu=True):
            assert model.generate is not original
            raise RuntimeError("boom")
    assert "generate" not in model.__dict__ and model.generate == original
    with kvarn.graph_generation(model) as outer:
        assert outer is model
        patched = model.generate
        with kvarn.graph_generation(model, on_cpu=True):
            inner = model.generate
            assert inner.__kvarn_original__ == original  # never wraps a wrapper
        assert model.generate is patched
    assert "generate" not in model.__dict__
    kvarn.enable(model, graph_generate=True)
    kvarn.enable(model, graph_generate=True)  # twice: still one patch over the original
    assert model.generate.__kvarn_original__ == original
    ids, mask = _prompts(2, 40, [0, 3])
    assert torch.equal(
        _generate(model, ids, mask, max_new_tokens=3),
        original(ids, attention_mask=mask, past_key_values=_cache(model), max_new_tokens=3),
    )
    kvarn.remove_graph_generation(model)
    kvarn.remove_graph_generation(model)
    assert "generate" not in model.__dict__
    assert kvarn.enable(model) is model and "generate" not in model.__dict__  # default: no patch
