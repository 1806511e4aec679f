"""KVarNCache inside tiny random-weight transformers models (Llama, Qwen2, Qwen3, Mistral, Gemma 3,
Phi-3): logits vs DynamicCache, padding, beam search, assisted decoding, presets, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, T5Config

import kvarn.cache.layer as layer_module
from kvarn.cache import CacheUsageError, KVarNCache, KVarNLayer, UnsupportedModelError
from kvarn.config import PRESETS, KVarNConfig
from kvarn.integrations.transformers import cache_for, enable
from tests.test_cache_common import (
    ARCHS,
    VOCAB,
    DenseOracleCache,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    plain_attention,
    tiny_model,
)

TILE = 32


def prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def teacher_forced_logits(model, cache, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of ``prefill`` tokens then one token at a time (teacher forcing)."""
    out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_k8v8_logits_track_dynamic_cache(arch):
    model = tiny_model(arch)
    ids = prompt(110, seed=1)
    model.set_attn_implementation("sdpa")
    want = teacher_forced_logits(model, DynamicCache(config=model.config), ids, prefill=45)
    cache = cache_for(model, "k8v8", tile_size=TILE)
    got = teacher_forced_logits(model, cache, ids, prefill=45)
    assert cache.get_seq_length() == 110
    if arch != "gemma3":  # gemma3's layer 0 is a 16-bit sliding layer
        assert isinstance(cache.layers[0], KVarNLayer) and cache.layers[0]._n_tiles == [2]
    # the prefill is exactly the 16-bit prefill; decode steps see 8-bit tiles
    torch.testing.assert_close(got[:, :45], want[:, :45], rtol=1e-5, atol=1e-5)
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 4e-2, f"{arch}: relative logit error {rel:.2e} (k4v4 gives ~0.15-0.2)"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.97


@torch.no_grad()
def test_model_attention_equals_plain_attention_over_materialize(monkeypatch):
    """Through a real model (rotary, scaling, GQA regrouping): every KVarN attention call equals
    float64 attention over materialize() + the call's new tokens."""
    model = tiny_model("qwen3", dtype=torch.float64)
    cache = cache_for(model, "k4v2", tile_size=TILE)
    original = KVarNLayer.attend
    checked = []

    def checking_attend(self, module, query, new_valid, scaling):
        keys, values = self.pending
        if self.is_initialized and self.columns:
            hist_k, hist_v = self.materialize()
        else:
            hist_k = hist_v = keys[:, :, :0]
        out = original(self, module, query, new_valid, scaling)
        length = query.shape[2]
        allowed = torch.ones(length, hist_k.shape[2] + length, dtype=torch.bool).tril(hist_k.shape[2])
        want = plain_attention(
            query[0],
            torch.cat([hist_k[0], keys[0]], 1),
            torch.cat([hist_v[0], values[0]], 1),
            allowed,
            scaling,
        )
        torch.testing.assert_close(out[0].transpose(0, 1), want, rtol=1e-9, atol=1e-9)
        checked.append(length)
        return out

    monkeypatch.setattr(KVarNLayer, "attend", checking_attend)
    ids = prompt(80, seed=2)
    teacher_forced_logits(model, cache, ids, prefill=37)
    assert len(checked) == 2 * (1 + 80 - 37)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padded_batch_matches_each_row_alone(arch):
    model = tiny_model(arch)
    enable(model)
    rows = [prompt(41, seed=3)[0], prompt(23, seed=4)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    cache = KVarNCache(config=model.config, quant="k4v2", tile_size=TILE)
    batched = model.generate(
        input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40, do_sample=False
    )
    if arch == "llama":
        assert cache.stored_lengths(0) == [41 + 39, 23 + 39]  # padding is never stored
    for i, r in enumerate(rows):
        alone = model.generate(
            input_ids=r[None],
            past_key_values=KVarNCache(config=model.config, quant="k4v2", tile_size=TILE),
            max_new_tokens=40,
            do_sample=False,
        )
        assert torch.equal(batched[i, width:], alone[0, len(r) :]), f"row {i}"


# Exact comparisons against the dense oracle use methods without rotation in float64: the cache
# rotates with a float64 matrix product, fake_quantize with a float32 butterfly, and that last-bit
# difference may move a code across a rounding boundary (tests/test_cache_layer.py covers rotation).
ORACLE_SPEC = "varn_norot:k4v2"


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_logits_equal_the_dense_oracle(arch):
    """Teacher-forced logits with KVarNCache (k4v2) equal sdpa over the dense oracle of its content."""
    model = tiny_model(arch, dtype=torch.float64)
    ids = prompt(100, seed=14)
    quant = KVarNConfig.parse(ORACLE_SPEC, tile_size=TILE)
    model.set_attn_implementation("sdpa")
    want = teacher_forced_logits(model, DenseOracleCache(model.config, quant), ids, prefill=37)
    got = teacher_forced_logits(model, cache_for(model, quant), ids, prefill=37)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # and the quantization is not a no-op: 16-bit logits differ
    model.set_attn_implementation("sdpa")
    dense = teacher_forced_logits(model, DynamicCache(config=model.config), ids, prefill=37)
    assert (dense - want).abs().max() > 1e-3


@torch.no_grad()
def test_beam_search_agrees_with_the_dense_oracle():
    model = tiny_model("llama", dtype=torch.float64)
    ids = prompt(50, seed=5, batch=2)
    quant = KVarNConfig.parse(ORACLE_SPEC, tile_size=TILE)
    model.set_attn_implementation("sdpa")
    kwargs = dict(num_beams=3, max_new_tokens=25, do_sample=False)
    want = model.generate(ids, past_key_values=DenseOracleCache(model.config, quant), **kwargs)
    cache = cache_for(model, quant)
    got = model.generate(ids, past_key_values=cache, **kwargs)
    assert cache.layers[0].batch == 6  # beams are rows of the cache
    assert torch.equal(got, want)


@torch.no_grad()
def test_assisted_decoding_with_crop_agrees_with_the_dense_oracle(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    crops = []
    original = KVarNLayer.crop

    def counting_crop(self, tokens_to_remove):
        if self.layer_idx == 0 and int(tokens_to_remove) < 0:
            crops.append((int(tokens_to_remove), list(self._n_tiles)))
        return original(self, tokens_to_remove)

    monkeypatch.setattr(KVarNLayer, "crop", counting_crop)
    base = prompt(12, seed=6)
    ids = torch.cat([base, base, base, base, base[:, :5]], dim=1)  # repetitive: prompt lookup drafts
    quant = KVarNConfig.parse(ORACLE_SPEC, tile_size=TILE)
    kwargs = dict(max_new_tokens=60, do_sample=False, prompt_lookup_num_tokens=4)
    model.set_attn_implementation("sdpa")
    want = model.generate(ids, past_key_values=DenseOracleCache(model.config, quant), **kwargs)
    cache = cache_for(model, quant)
    got = model.generate(ids, past_key_values=cache, **kwargs)
    assert crops, "assisted decoding never rejected a draft"
    assert torch.equal(got, want)
    assert cache.stored_lengths(0) == [got.shape[1] - 1]


@torch.no_grad()
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("keep_sink", [True, False])
def test_every_preset_generates(preset, keep_sink):
    model = tiny_model("qwen2")
    cache = cache_for(model, preset, tile_size=TILE, keep_sink_tile=keep_sink)
    out = model.generate(prompt(40, seed=7), max_new_tokens=30, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 70)
    layer = cache.layers[0]
    assert layer._sink_len == [TILE if keep_sink else 0]
    assert layer.stored_lengths() == [69]  # the last generated token is never fed back
    nb = cache.nbytes()
    assert nb.quantized > 0 and nb.total < cache.dynamic_cache_nbytes()


@torch.no_grad()
def test_sampling_runs():
    model = tiny_model("mistral")
    cache = cache_for(model, "k4v2", tile_size=TILE)
    out = model.generate(
        prompt(30, seed=8), do_sample=True, top_k=20, max_new_tokens=40, past_key_values=cache
    )
    assert out.shape == (1, 70) and cache.layers[1]._n_tiles == [1]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = tiny_model("llama", dtype=dtype)
    ids = prompt(90, seed=9)
    model.set_attn_implementation("sdpa")
    want = teacher_forced_logits(model, DynamicCache(config=model.config), ids, prefill=40).float()
    got = teacher_forced_logits(model, cache_for(model, "k8v8", tile_size=TILE), ids, prefill=40).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max() / want.abs().max() < 5e-2


@torch.no_grad()
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    model = tiny_model("llama", head_dim=head_dim)
    ids = prompt(75, seed=10)
    model.set_attn_implementation("sdpa")
    want = teacher_forced_logits(model, DynamicCache(config=model.config), ids, prefill=33)
    got = teacher_forced_logits(model, cache_for(model, "k8v8", tile_size=TILE), ids, prefill=33)
    assert (got - want).abs().max() / want.abs().max() < 4e-2


@torch.no_grad()
def test_mqa_model():
    model = tiny_model("llama", num_key_value_heads=1)
    ids = prompt(70, seed=11)
    model.set_attn_implementation("sdpa")
    want = teacher_forced_logits(model, DynamicCache(config=model.config), ids, prefill=35)
    got = teacher_forced_logits(model, cache_for(model, "k8v8", tile_size=TILE), ids, prefill=35)
    assert (got - want).abs().max() / want.abs().max() < 4e-2


def test_sliding_window_layers_stay_16bit():
    gemma = tiny_model("gemma3")
    cache = KVarNCache(config=gemma.config, quant="k4v2")
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicSlidingWindowLayer", "KVarNLayer"]
    mistral = tiny_model("mistral", sliding_window=64)
    with pytest.warns(UserWarning, match="nothing will be quantized"):
        KVarNCache(config=mistral.config, quant="k4v2")


@torch.no_grad()
def test_kvarn_attention_without_kvarn_cache_is_sdpa():
    """With a DynamicCache or no cache, the "kvarn" implementation falls back to sdpa exactly."""
    model = tiny_model("gemma3")
    ids = prompt(40, seed=12)
    model.set_attn_implementation("sdpa")
    want = model(ids).logits
    enable(model)
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    torch.testing.assert_close(
        model(ids, past_key_values=DynamicCache(config=model.config)).logits, want, rtol=0, atol=0
    )


@torch.no_grad()
def test_errors_are_clear():
    model = tiny_model("llama")
    ids = prompt(20, seed=13)
    # non-kvarn attention implementation
    model.set_attn_implementation("sdpa")
    with pytest.raises(CacheUsageError, match="'kvarn'"):
        model.generate(ids, max_new_tokens=3, past_key_values=KVarNCache(config=model.config))
    enable(model)
    # cache reused with another model of the same shape
    cache = KVarNCache(config=model.config, tile_size=TILE)
    model(ids, past_key_values=cache)
    other = tiny_model("llama", seed=1)
    enable(other)
    other.config = model.config  # same config object: only the module identity differs
    with pytest.raises(CacheUsageError, match="another model"):
        other(ids[:, :1], past_key_values=cache)
    # cache built for another config
    small = tiny_model("llama", num_key_value_heads=1)
    with pytest.raises(CacheUsageError, match="another model config"):
        enable(small)(ids, past_key_values=KVarNCache(config=model.config))
    # batch size and dtype changes mid-generation
    cache = KVarNCache(config=model.config, tile_size=TILE)
    model(ids, past_key_values=cache)
    with pytest.raises(CacheUsageError, match="batch size changed"):
        model(prompt(1, batch=2), past_key_values=cache)
    cache = KVarNCache(config=model.config, tile_size=TILE)
    model(ids, past_key_values=cache)
    with pytest.raises(CacheUsageError, match="dtype changed"):
        model.to(torch.float64)(ids[:, :1], past_key_values=cache)
    model.to(torch.float32)
    # a prepared 4D mask cannot be honoured (padding must come as the 2D mask)
    cache = KVarNCache(config=model.config, tile_size=TILE)
    mask4d = torch.ones(1, 1, 20, 20, dtype=torch.bool).tril()
    with pytest.raises(CacheUsageError, match="2D padding mask"):
        model(ids, attention_mask=mask4d, past_key_values=cache)
    # unsupported methods and models
    with pytest.raises(ValueError, match="fake_quantize"):
        KVarNCache(config=model.config, quant="fp8_e4m3")
    with pytest.raises(ValueError, match="fake_quantize"):
        KVarNCache(config=model.config, quant="per_token_rtn:k4v4")
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        KVarNCache(config=T5Config())
    odd = tiny_model("llama")
    odd.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        KVarNCache(config=odd.config)
    with pytest.raises(UnsupportedModelError, match="needs the model's transformers config"):
        KVarNCache(config={"num_hidden_layers": 2})
    with pytest.raises(UnsupportedModelError, match="layer_idx"):
        KVarNCache(config=model.config).update(torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 32), None)


def test_layer_module_exports_the_seam():
    # the cache reaches the kernel seam (where a Triton kernel plugs in) for decode steps
    assert layer_module.quantized_decode_attention.__module__ == "kvarn.attention.decode"


@torch.no_grad()
def test_from_pretrained_with_kvarn_attention(tmp_path):
    """`import kvarn` makes "kvarn" a valid attn_implementation for from_pretrained."""
    from transformers import AutoModelForCausalLM

    import kvarn  # noqa: F401  (registers)

    tiny_model("qwen3").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="kvarn").eval()
    assert model.config._attn_implementation == "kvarn"
    cache = KVarNCache(config=model.config, quant="k4v2", tile_size=TILE)
    out = model.generate(prompt(40, seed=15), max_new_tokens=30, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 70) and cache.layers[0]._n_tiles == [1]
