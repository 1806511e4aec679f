"""CUDA-graph decoding (kvarn.integrations.cuda_graph), checked on CPU.

A graph replays the ops recorded once, so the device step must (1) compute what an eager decode
step computes, (2) dispatch exactly the same ops on the same buffers at every step, whatever the
rows' tail offsets and tile counts, and (3) never read device data on the host. (1) is checked
against ``model.generate`` token for token, (2) and (3) with the op tracer of
``kvarn.cache.profiling`` while the cache takes its CUDA code path on CPU.
"""

from __future__ import annotations

import pytest
import torch

import kvarn
from kvarn.cache import CacheUsageError, UnsupportedModelError
from kvarn.cache.profiling import counting, gpu_path_on_cpu
from kvarn.integrations.cuda_graph import GraphDecoder, graph_generate
from kvarn.integrations.sampling import SamplingConfig, sample_next
from tests.test_cache_common import VOCAB, one_torch_thread, tiny_model  # noqa: F401

TILE = 32


def _prompts(batch: int, length: int, pads: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def _reference(model, ids, mask, new_tokens: int, **kwargs):
    cache = kvarn.KVarNCache(config=model.config, quant="k4v2", tile_size=TILE)
    return model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False, **kwargs
    )


@pytest.mark.parametrize(
    "arch, length, pads",
    [
        ("llama", 70, [0, 5, 17]),  # rows at three tail offsets, every sink full after prefill
        ("qwen3", 40, [0, 20]),  # row 1 holds 20 tokens: its sink fills during decoding (eager steps first)
    ],
)
def test_graph_decoder_matches_generate(arch, length, pads):
    model = kvarn.enable(tiny_model(arch))
    ids, mask = _prompts(len(pads), length, pads)
    new_tokens = 2 * TILE + 5  # several tile completions per row, at different steps per row
    expected = _reference(model, ids, mask, new_tokens)
    decoder = GraphDecoder(model, kvarn.KVarNCache(config=model.config, quant="k4v2", tile_size=TILE))
    got = decoder.generate(ids, mask, max_new_tokens=new_tokens)
    assert torch.equal(got, expected)
    stats = decoder.stats
    assert stats.replays > 0 and stats.recordings == 0  # CPU: the device step runs eagerly
    assert stats.eager_steps + stats.replays == new_tokens
    if min(length - p for p in pads) < TILE:  # a sink filled during decoding: eager steps until then
        assert stats.eager_steps > 1
    else:
        assert stats.eager_steps == 1  # the prefill only


def test_graph_decoder_stops_like_generate():
    model = kvarn.enable(tiny_model("llama", seed=3))
    ids, mask = _prompts(3, 44, [0, 4, 9], seed=3)
    free = _reference(model, ids, mask, 40)
    # A stop token that row 0 produces early on, taken from the free run (data, not a constant).
    stop = int(free[0, 44 + 5])
    expected = _reference(model, ids, mask, 40, eos_token_id=stop, pad_token_id=stop)
    got = GraphDecoder(model, kvarn.KVarNCache(config=model.config, tile_size=TILE)).generate(
        ids, mask, max_new_tokens=40, eos_token_id=stop
    )
    assert torch.equal(got, expected)


def test_graph_generate_one_call():
    model = tiny_model("llama")
    ids, mask = _prompts(2, 140, [0, 3])  # default 128-token tiles
    got = graph_generate(model, ids, mask, max_new_tokens=6)
    cache = kvarn.KVarNCache(config=model.config)
    expected = model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "sampling",
    [{}, dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)],
    ids=["greedy", "sampled"],
)
def test_device_step_is_the_same_work_at_every_step(monkeypatch, sampling):
    """What the recording assumes: every decode step dispatches the same ops with the same
    arguments on the same persistent buffers (no host offsets, no host lengths), and never
    synchronizes; rows sit at different tail offsets and tiles complete between steps. Sampled
    steps too: the filters and the draw are fixed-shape device ops on the same generator."""
    model = kvarn.enable(tiny_model("llama", dtype=torch.bfloat16))
    ids, mask = _prompts(3, 50, [0, 6, 13])
    cache = kvarn.KVarNCache(config=model.config, tile_size=TILE)
    decoder = GraphDecoder(model, cache)
    traces, syncs = [], []
    device_step = GraphDecoder._device_step

    def traced(self):
        with counting(trace=True) as counter:
            counter.persistent = {ptr for layer in cache.kvarn_layers for ptr, _ in layer.graph_buffers()}
            counter.persistent |= {
                t.untyped_storage().data_ptr() for t in (self._ids, self._pos, self._cache_pos)
            }
            out = device_step(self)
        traces.append(counter.trace)
        syncs.append(counter.syncs + ["upload"] * counter.uploads)
        return out

    monkeypatch.setattr(GraphDecoder, "_device_step", traced)
    with gpu_path_on_cpu("twin"):
        decoder.generate(ids, mask, max_new_tokens=2 * TILE + 3, **sampling)
    assert len(traces) == 2 * TILE + 2  # every step after the prefill replayable
    assert all(s == [] for s in syncs), syncs
    kernels = [op for op in traces[0] if op[0] == "kernel"]
    assert kernels.count(("kernel", "decode_attention")) == 2  # one per layer; no compression inside
    buffers = [op for op in traces[0] if any(isinstance(a, tuple) and a[:1] == ("buffer",) for a in op[1])]
    assert buffers, "the trace sees the cache's buffers"
    for step, trace in enumerate(traces[1:], start=1):
        if trace != traces[0]:
            first = next(i for i, (a, b) in enumerate(zip(trace, traces[0], strict=False)) if a != b)
            pytest.fail(
                f"step {step} differs from step 0 at op {first}: {trace[first]} vs {traces[0][first]}"
            )


def test_graph_decoder_rejects_what_it_cannot_replay():
    gemma = tiny_model("gemma3")  # a sliding-window layer: a growing 16-bit cache
    with pytest.raises(UnsupportedModelError, match="every layer to be a KVarN layer"):
        GraphDecoder(gemma, kvarn.KVarNCache(config=kvarn.enable(gemma).config))
    model = tiny_model("llama")
    cache = kvarn.KVarNCache(config=kvarn.enable(model).config, tile_size=TILE)
    with pytest.raises(TypeError, match="KVarNCache"):
        GraphDecoder(model, object())
    ids, mask = _prompts(2, 40, [0, 3])
    decoder = GraphDecoder(model, cache, capture=True)
    with pytest.raises(ValueError, match="CUDA device"):
        decoder.generate(ids, mask, max_new_tokens=4)
    decoder = GraphDecoder(model, cache)
    with pytest.raises(ValueError, match="int64"):
        decoder.generate(ids.float(), mask)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="does not match"):
        decoder.generate(ids, mask[:, 1:])
    right_padded = mask.clone()
    right_padded[1, -1] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        decoder.generate(ids, right_padded)
    decoder.generate(ids, mask, max_new_tokens=2)
    with pytest.raises(CacheUsageError, match="empty cache"):
        decoder.generate(ids, mask, max_new_tokens=2)


def test_resume_takes_over_a_prefilled_cache():
    model = kvarn.enable(tiny_model("llama", seed=1))
    ids, mask = _prompts(2, 45, [0, 7], seed=1)
    expected = _reference(model, ids, mask, 12)
    cache = kvarn.KVarNCache(config=model.config, tile_size=TILE)
    decoder = GraphDecoder(model, cache)
    with pytest.raises(CacheUsageError, match="before start"):
        decoder.step()
    with pytest.raises(CacheUsageError, match="holds the prompt"):
        decoder.resume(ids[:, -1])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)
    with pytest.raises(ValueError, match="one per cached row"):
        decoder.resume(first[:1])
    decoder.resume(first)
    got = torch.stack([first] + [decoder.step() for _ in range(11)], dim=1)
    assert torch.equal(got, expected[:, 45:])


# ---- sampling -----------------------------------------------------------------------------------
def _sampled(model, ids, mask, new_tokens: int, seed: int | None, **kwargs):
    decoder = GraphDecoder(model, kvarn.KVarNCache(config=model.config, quant="k4v2", tile_size=TILE))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    tokens = decoder.generate(
        ids, mask, max_new_tokens=new_tokens, do_sample=True, generator=generator, **kwargs
    )
    return tokens, decoder.stats


@pytest.mark.parametrize("arch, length, pads", [("llama", 70, [0, 5, 17]), ("qwen3", 40, [0, 20])])
def test_top_k_1_sampling_is_greedy(arch, length, pads):
    model = kvarn.enable(tiny_model(arch))
    ids, mask = _prompts(len(pads), length, pads)
    expected = _reference(model, ids, mask, TILE + 5)
    got, _ = _sampled(model, ids, mask, TILE + 5, seed=0, top_k=1, temperature=0.5, top_p=0.8)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_by_seed():
    model = kvarn.enable(tiny_model("qwen3"))  # row 1's sink fills during decoding: eager steps first
    ids, mask = _prompts(2, 40, [0, 20])
    options = dict(temperature=1.0, top_p=0.9)
    first, stats = _sampled(model, ids, mask, TILE + 20, seed=7, **options)
    again, _ = _sampled(model, ids, mask, TILE + 20, seed=7, **options)
    other, _ = _sampled(model, ids, mask, TILE + 20, seed=8, **options)
    assert torch.equal(first, again)
    assert not torch.equal(first[:, 40:], other[:, 40:])
    assert stats.eager_steps > 1 and stats.replays > 0  # eager and device steps draw alike
    assert not torch.equal(first, _reference(model, ids, mask, TILE + 20))  # it did sample
    torch.manual_seed(11)  # generator=None: torch's default generator
    default, _ = _sampled(model, ids, mask, TILE + 20, seed=None, **options)
    torch.manual_seed(11)
    assert torch.equal(default, _sampled(model, ids, mask, TILE + 20, seed=None, **options)[0])


def test_sampled_tokens_lie_in_the_filtered_support(monkeypatch):
    """Every token (prefill's and each step's) is one the filters kept for that step's logits,
    here within the top 3, and the logits are the step's own (the draw is not skipped)."""
    from kvarn.integrations import cuda_graph

    model = kvarn.enable(tiny_model("llama", seed=2))
    ids, mask = _prompts(3, 70, [0, 5, 17], seed=2)
    seen = []

    def recording(logits, config, generator=None):
        tokens = sample_next(logits, config, generator)
        seen.append((logits.clone(), tokens.clone()))
        return tokens

    monkeypatch.setattr(cuda_graph, "sample_next", recording)
    got, stats = _sampled(model, ids, mask, 24, seed=1, top_k=3, temperature=2.0)
    assert len(seen) == 24 and stats.replays == 23
    assert torch.equal(got[:, 70:], torch.stack([tokens for _, tokens in seen], dim=1))
    for logits, tokens in seen:
        top3 = logits.topk(3, dim=-1).indices
        assert bool((top3 == tokens[:, None]).any(dim=-1).all())
    assert any(not torch.equal(tokens, logits.argmax(-1)) for logits, tokens in seen)  # not greedy


def test_sampling_stops_like_a_free_run_masked():
    """With a stop token, a sampled run is the free run with the same seed, each row padded after
    its first stop token (the device keeps drawing for stopped rows, so the others' draws are the
    same), and trimmed once every row has stopped."""
    model = kvarn.enable(tiny_model("llama", seed=3))
    ids, mask = _prompts(3, 44, [0, 4, 9], seed=3)
    options = dict(temperature=0.8, top_k=5)
    free, _ = _sampled(model, ids, mask, 40, seed=5, **options)
    new = free[:, 44:]
    stop, pad = int(new[0, 5]), 1
    got, _ = _sampled(model, ids, mask, 40, seed=5, eos_token_id=[stop], pad_token_id=pad, **options)
    stopped = (new == stop).cummax(dim=1).values
    after = torch.cat([torch.zeros_like(stopped[:, :1]), stopped[:, :-1]], dim=1)
    expected = new.masked_fill(after, pad)
    if bool(stopped[:, -1].all()):
        expected = expected[:, : int(stopped.all(dim=0).nonzero()[0]) + 1]
    assert torch.equal(got, torch.cat([ids, expected], dim=1))


def test_resume_samples_too():
    model = kvarn.enable(tiny_model("llama", seed=1))
    ids, mask = _prompts(2, 45, [0, 7], seed=1)
    runs = []
    for _ in range(2):
        decoder = GraphDecoder(model, kvarn.KVarNCache(config=model.config, tile_size=TILE))
        first = decoder.start(ids, mask, 12)
        decoder.resume(first, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(4))
        runs.append(torch.stack([decoder.step() for _ in range(11)], dim=1))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], _reference(model, ids, mask, 12)[:, 46:])


def test_bad_sampling_options_are_refused_before_the_prefill():
    model = kvarn.enable(tiny_model("llama"))
    ids, mask = _prompts(2, 40, [0, 3])
    cache = kvarn.KVarNCache(config=model.config, tile_size=TILE)
    decoder = GraphDecoder(model, cache)
    for options, name in [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_k=0), "top_k"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, min_p=-1.0), "min_p"),
        (dict(do_sample=True, generator=123), "generator"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            decoder.generate(ids, mask, max_new_tokens=4, **options)
    assert not any(layer.is_initialized for layer in cache.kvarn_layers)
    with pytest.raises(ValueError, match="^generator is on cpu, the inputs on cuda"):
        GraphDecoder._sampling_config(torch.device("cuda"), torch.Generator(), do_sample=True)
    with pytest.raises(TypeError, match="top_q"):
        decoder.generate(ids, mask, max_new_tokens=2, do_sample=True, top_q=0.9)
    with pytest.raises(ValueError, match="^temperature must be"):
        graph_generate(model, ids, mask, max_new_tokens=2, do_sample=True, temperature=-1.0)
    decoder.generate(ids, mask, max_new_tokens=2, do_sample=False, temperature=0.0)  # greedy: ignored


def test_a_callers_generator_is_registered_with_each_recording():
    """What makes CUDA replays draw fresh numbers from the caller's generator (CPU: a stand-in
    graph): it is registered before capture; greedy steps and the default generator need no
    registration (capture_begin registers the default one)."""
    model = tiny_model("llama")
    decoder = GraphDecoder(model, kvarn.KVarNCache(config=kvarn.enable(model).config, tile_size=TILE))

    class Graph:
        def __init__(self):
            self.registered = []

        def register_generator_state(self, generator):
            self.registered.append(generator)

    generator = torch.Generator()
    for config, gen, expected in [
        (SamplingConfig(), generator, []),
        (SamplingConfig(do_sample=True, top_k=1), generator, []),
        (SamplingConfig(do_sample=True), None, []),
        (SamplingConfig(do_sample=True, top_p=0.9), generator, [generator]),
    ]:
        decoder._sampling, decoder._generator = config, gen
        graph = Graph()
        decoder._register_generator(graph)
        assert graph.registered == expected
    with pytest.raises(UnsupportedModelError, match="register_generator_state"):
        decoder._register_generator(object())
