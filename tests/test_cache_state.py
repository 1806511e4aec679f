"""Saving a KVarNCache to one safetensors file and loading it back (kvarn.save_cache / load_cache)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kvarn
from kvarn import CacheFileError, CacheStateError, KVarNCache, load_cache, save_cache
from kvarn.cache import KVarNLayer, handoff
from tests.test_cache_common import VOCAB, one_torch_thread, tiny_model  # noqa: F401 (fixture)

TILE = 32
LENGTHS = (150, 97, 40)  # left-padded batch: 3 tiles + tail, 2 tiles + tail, sink + tail (G=32)


def padded_batch(lengths=LENGTHS, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(2, VOCAB, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


def filled(arch: str, dtype=torch.float32, quant="k4v2", **overrides):
    """A model and a KVarNCache after a padded prefill and 3 decode steps; the tokens and mask."""
    model = tiny_model(arch, dtype=dtype)
    kvarn.enable(model)
    ids, mask = padded_batch()
    cache = KVarNCache(config=model.config, quant=quant, tile_size=TILE, **overrides)
    out = model.generate(
        input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3, do_sample=False
    )
    return model, cache, out, extend(mask, out)


def extend(mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    extra = tokens.shape[1] - mask.shape[1]
    return torch.cat([mask, torch.ones(mask.shape[0], extra, dtype=mask.dtype)], dim=1)


def continue_greedy(model, cache, tokens, mask, steps=20):
    return model.generate(
        input_ids=tokens, attention_mask=mask, past_key_values=cache, max_new_tokens=steps, do_sample=False
    )


def assert_same_cache(a: KVarNCache, b: KVarNCache) -> None:
    assert len(a.layers) == len(b.layers)
    assert a.nbytes().as_dict() | {"allocated": 0} == b.nbytes().as_dict() | {"allocated": 0}
    assert a.get_seq_length() == b.get_seq_length()
    for idx, layer in enumerate(a.layers):
        assert type(layer) is type(b.layers[idx])
        ka, va = a.materialize(idx)
        kb, vb = b.materialize(idx)
        assert ka.dtype == kb.dtype and torch.equal(ka, kb) and torch.equal(va, vb), f"layer {idx}"
        if isinstance(layer, KVarNLayer):
            assert layer.stored_lengths() == b.layers[idx].stored_lengths()
            assert layer._trailing_real == b.layers[idx]._trailing_real
            assert torch.equal(layer._counters, b.layers[idx]._counters)


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("llama", torch.float32),
        ("llama", torch.bfloat16),
        ("qwen3", torch.float32),
        ("qwen3", torch.bfloat16),
        ("gemma3", torch.float32),
    ],
)
def test_round_trip_continues_token_for_token(tmp_path, arch, dtype):
    model, cache, tokens, mask = filled(arch, dtype)
    path = tmp_path / "prefix.safetensors"
    save_cache(cache, path)
    loaded = load_cache(path, config=model.config)

    assert_same_cache(cache, loaded)
    total = cache.nbytes().total
    assert cache.nbytes().allocated > total  # the original holds spare capacity and padding slots ...
    assert total <= path.stat().st_size <= 1.02 * total + 8192  # ... the file does not

    # decoding on from the loaded cache gives exactly the tokens of decoding on from the original;
    # the 20 steps complete tiles of the rows whose tails hold 22 and 20 tokens
    expected = continue_greedy(model, cache, tokens, mask)
    got = continue_greedy(model, loaded, tokens, mask)
    assert torch.equal(got, expected)
    assert_same_cache(cache, loaded)


@pytest.mark.parametrize("quant", ["kivi:k2v2", "hadamard_rtn:k3v2"])
def test_round_trip_other_quantizers(tmp_path, quant):
    # no sink tile, float16 metadata, non-rotating and rotating methods
    model, cache, tokens, mask = filled("llama", quant=quant, keep_sink_tile=False, metadata_dtype="float16")
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors", config=model.config, device="cpu", quant=cache.quant)
    assert loaded.quant == cache.quant
    assert_same_cache(cache, loaded)
    assert torch.equal(
        continue_greedy(model, loaded, tokens, mask, 8), continue_greedy(model, cache, tokens, mask, 8)
    )


def test_loaded_cache_saves_again_and_reserves(tmp_path):
    model, cache, tokens, mask = filled("qwen3")
    save_cache(cache, tmp_path / "a.safetensors")
    loaded = load_cache(tmp_path / "a.safetensors", config=model.config, device=torch.device("cpu"))
    assert all(layer.device == torch.device("cpu") for layer in loaded.kvarn_layers)
    loaded.reserve(400)
    assert all(layer.store.capacity == layer._tiles_for(400) for layer in loaded.kvarn_layers)
    more = continue_greedy(model, loaded, tokens, mask, 12)
    save_cache(loaded, tmp_path / "b.safetensors")
    again = load_cache(tmp_path / "b.safetensors", config=model.config)
    assert_same_cache(loaded, again)
    more_mask = extend(mask, more)
    assert torch.equal(
        continue_greedy(model, again, more, more_mask, 6), continue_greedy(model, loaded, more, more_mask, 6)
    )


def test_saved_prefix_serves_other_suffixes(tmp_path):
    """Prompt caching: a prefix prefilled by a forward call, saved once, loaded per request; each
    request's suffix (a prefill into the non-empty cache) and decoding match the unsaved cache."""
    model = tiny_model("llama")
    kvarn.enable(model)
    prefix, prefix_mask = padded_batch((70, 45))

    def prefilled():
        cache = KVarNCache(config=model.config, quant="k4v2", tile_size=TILE)
        with torch.no_grad():
            model(input_ids=prefix, attention_mask=prefix_mask, past_key_values=cache)
        return cache

    save_cache(prefilled(), tmp_path / "prefix.safetensors")
    for seed in (1, 2):
        suffix = torch.randint(2, VOCAB, (2, 30), generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([prefix, suffix], dim=1)
        mask = extend(prefix_mask, ids)
        loaded = load_cache(tmp_path / "prefix.safetensors", config=model.config)
        expected = continue_greedy(model, prefilled(), ids, mask, 10)
        assert torch.equal(continue_greedy(model, loaded, ids, mask, 10), expected)


def test_loaded_cache_crops_and_selects_rows_like_the_original(tmp_path):
    _, cache, _, _ = filled("qwen3")
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors")
    for c in (cache, loaded):
        c.crop(-5)  # into the tile the last decode steps completed, for some rows
        c.batch_select_indices(torch.tensor([2, 0]))
    assert_same_cache(cache, loaded)


def test_load_without_config(tmp_path):
    model, cache, tokens, mask = filled("gemma3")
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors")
    assert loaded.model_config is None
    assert_same_cache(cache, loaded)
    assert torch.equal(
        continue_greedy(model, loaded, tokens, mask, 5), continue_greedy(model, cache, tokens, mask, 5)
    )
    save_cache(loaded, tmp_path / "d.safetensors")  # the saved fingerprint goes on
    load_cache(tmp_path / "d.safetensors", config=model.config)


def test_layer_state_is_valid_slots_only():
    model, cache, _, _ = filled("llama")
    layer = cache.kvarn_layers[0]
    tensors, meta = layer.state()
    assert tensors["k_codes"].shape[0] == sum(layer._n_tiles) == 3 + 2 + 0
    assert tensors["tail"].shape == (sum(layer._tail_len), 2, layer.num_kv_heads, layer.head_dim)
    assert meta["batch"] == 3 and meta["columns"] == layer.columns and meta["dtype"] == "float32"
    rebuilt = KVarNLayer.from_state(tensors, meta, model_config=model.config)
    assert [torch.equal(x, y) for x, y in zip(rebuilt.materialize(), layer.materialize(), strict=True)] == [
        True,
        True,
    ]


def _rewrite(src, dst, drop=(), **header):
    with safe_open(str(src), framework="pt") as f:
        metadata = {**f.metadata(), **header}
        tensors = {name: f.get_tensor(name) for name in f.keys() if name not in drop}  # noqa: SIM118
    save_file(tensors, str(dst), metadata=metadata)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, cache, _, _ = filled("llama")
    path = tmp_path_factory.mktemp("state") / "llama.safetensors"
    save_cache(cache, path)
    return model, path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 4}, "num_key_value_heads is 2 in the file but 4"),
        ({"head_dim": 64}, "head_dim is 32 in the file but 64"),
        ({"num_hidden_layers": 3}, "num_hidden_layers is 2 in the file but 3"),
        ({"sliding_window": 16}, "layer_types"),
    ],
)
def test_other_model_config_is_refused(saved, change, message):
    model, path = saved
    config = copy.deepcopy(model.config)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(CacheFileError, match=message):
        load_cache(path, config=config)


def test_other_model_type_and_quant_are_refused(saved):
    model, path = saved
    with pytest.raises(CacheFileError, match="model_type is 'llama' in the file but 'qwen3'"):
        load_cache(path, config=tiny_model("qwen3").config)
    with pytest.raises(CacheFileError, match="not the requested"):
        load_cache(path, config=model.config, quant="k4v4")


def test_damaged_and_foreign_files_are_refused(saved, tmp_path):
    model, path = saved
    data = path.read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheFileError, match="not a readable safetensors file"):
        load_cache(tmp_path / "truncated", config=model.config)
    (tmp_path / "text").write_text("hello")
    with pytest.raises(CacheFileError, match="not a readable safetensors file"):
        load_cache(tmp_path / "text")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign"))
    with pytest.raises(CacheFileError, match="not a kvarn cache"):
        load_cache(tmp_path / "foreign")
    _rewrite(path, tmp_path / "missing", drop=("layers.1.v_zero",))
    with pytest.raises(CacheFileError, match=r"layer 1: missing tensors \['v_zero'\]"):
        load_cache(tmp_path / "missing", config=model.config)
    _rewrite(path, tmp_path / "newer", format_version="99")
    with pytest.raises(CacheFileError, match="format version '99' is not supported"):
        load_cache(tmp_path / "newer", config=model.config)
    with safe_open(str(path), framework="pt") as f:
        layers = json.loads(f.metadata()["layers"])
    layers[0]["batch"] = 4
    _rewrite(path, tmp_path / "batch", layers=json.dumps(layers))
    with pytest.raises(CacheFileError, match=r"counters of shape \(4, 3\), expected \(4, 4\)"):
        load_cache(tmp_path / "batch", config=model.config)
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "nowhere")


def test_caches_not_at_rest_are_refused(tmp_path):
    model = tiny_model("gemma3")
    kvarn.enable(model)
    cache = KVarNCache(config=model.config, quant="k4v2", tile_size=TILE)
    with pytest.raises(CacheStateError, match="empty"):
        save_cache(cache, tmp_path / "empty.safetensors")
    ids, mask = padded_batch((40, 20))
    model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    layer = cache.layers[1]
    x = torch.zeros(2, 2, 1, 32)
    layer.update(x, x)
    with pytest.raises(CacheStateError, match="forward call is in progress"):
        save_cache(cache, tmp_path / "x.safetensors")
    layer.pending = None
    handoff.clear()
    layer.graph_steps = True
    with pytest.raises(CacheStateError, match="CUDA-graph"):
        save_cache(cache, tmp_path / "x.safetensors")
    layer.graph_steps = False
    cache.layers[0].activate_past_recording()
    with pytest.raises(CacheStateError, match="sliding-window layer 0: past recording"):
        save_cache(cache, tmp_path / "x.safetensors")
    cache.layers[0].record_past = False
    layer.activate_past_recording()
    with pytest.raises(CacheStateError, match="layer 1: past recording"):
        save_cache(cache, tmp_path / "x.safetensors")
    layer.record_past = False
    save_cache(cache, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="KVarNCache"):
        save_cache(object(), tmp_path / "y.safetensors")


def test_graph_decoder_resumes_a_loaded_cache(tmp_path):
    """A saved prefix continued by GraphDecoder (its eager twin on CPU): the same tokens from the
    loaded cache as from the original, and as model.generate continuing the original."""
    from kvarn.integrations.cuda_graph import GraphDecoder

    model, cache, tokens, mask = filled("llama")
    path = tmp_path / "prefix.safetensors"
    save_cache(cache, path)
    expected = continue_greedy(model, copy.deepcopy(cache), tokens, mask, steps=40)[:, tokens.shape[1] :]
    runs = []
    for source in (cache, load_cache(path, config=model.config)):
        decoder = GraphDecoder(model, source)
        decoder.resume(tokens[:, -1])  # the last token generated is the next one fed in
        runs.append(torch.stack([decoder.step() for _ in range(40)], dim=1))
        assert decoder.stats.replays > 0
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[1], expected)
