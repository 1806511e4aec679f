"""Capture of post-RoPE Q/K/V: the records are exactly what the model's attention used."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvarn.capture import capture_qkv, real_text_tokens, record_attention
from kvarn.integrations.models import TINY_ARCHITECTURES, byte_level_tokenizer, make_tiny_model


def naive_attention(q, k, v, scaling, mask=None):
    """Slow, obviously-correct float64 attention: GQA by repeating KV heads, causal or given mask."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scaling
    t_q, t_k = q.shape[2], k.shape[2]
    allowed = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)
    if mask is not None:  # SDPA boolean mask [B, 1, Tq, Tk]: True = attend
        allowed = allowed & mask.bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0
    return probs @ v


def _hook_attention_modules(model):
    """Independent of the capture: the inputs and outputs of every self_attn module."""
    seen = {}
    handles = []
    for idx, layer in enumerate(model.model.layers):

        def pre(module, args, kwargs, idx=idx):
            seen.setdefault(idx, {})["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
            seen[idx]["pos"] = kwargs["position_embeddings"]

        def post(module, args, kwargs, output, idx=idx):
            seen[idx]["out"] = output[0]

        handles.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("padded", [False, True])
def test_capture_reproduces_attention_module_outputs(architecture, padded):
    model, _ = make_tiny_model(
        architecture, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2
    )
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 37))
    mask = None
    if padded:  # left padding: the second sequence has 5 pad positions
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
    seen, handles = _hook_attention_modules(model)
    try:
        layers = capture_qkv(model, ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    assert [layer.layer_idx for layer in layers] == [0, 1, 2]
    for layer, attn in zip(layers, model.model.layers, strict=True):
        module = attn.self_attn
        assert layer.queries.shape == (2, 6, 37, 16) and layer.keys.shape == (2, 2, 37, 16)
        assert layer.values.shape == layer.keys.shape and layer.num_key_value_groups == 3
        assert layer.scaling == module.scaling
        # Post-RoPE: recompute the projections and rotary embedding from the module's own inputs.
        hidden = seen[layer.layer_idx]["hidden"]
        cos, sin = seen[layer.layer_idx]["pos"]
        shape = (*hidden.shape[:-1], -1, 16)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        v = module.v_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        torch.testing.assert_close(layer.queries, q.detach())
        torch.testing.assert_close(layer.keys, k.detach())
        torch.testing.assert_close(layer.values, v.detach())
        # Feeding the records to a naive attention + o_proj gives the module's output.
        if padded:
            assert layer.attention_mask is not None
        out = naive_attention(layer.queries, layer.keys, layer.values, layer.scaling, layer.attention_mask)
        out = out.transpose(1, 2).reshape(2, 37, -1).float()
        expected = seen[layer.layer_idx]["out"]
        valid = torch.ones(2, 37, dtype=torch.bool) if mask is None else mask.bool()
        torch.testing.assert_close(module.o_proj(out)[valid], expected[valid], atol=1e-5, rtol=1e-4)


def test_capture_restores_attention_implementation_also_on_error():
    model, _ = make_tiny_model("llama", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(0, 256, (1, 9))
    with record_attention(model) as layers:
        assert model.config._attn_implementation == "kvarn_capture"
        model(ids)
    assert model.config._attn_implementation == "eager" and len(layers) == 2
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    # Outside the context nothing is recorded, even if the model still uses the capture function.
    model.set_attn_implementation("kvarn_capture")
    model(ids)
    model.set_attn_implementation("eager")
    assert len(layers) == 2


def test_capture_bad_input():
    model, _ = make_tiny_model("llama")
    with pytest.raises(ValueError, match="batch, tokens"):
        capture_qkv(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        capture_qkv(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        with record_attention(torch.nn.Linear(2, 2)):
            pass


def test_real_text_tokens_is_deterministic_real_text():
    tokenizer = byte_level_tokenizer()
    ids = real_text_tokens(tokenizer, 6000)
    assert ids.shape == (1, 6000) and ids.dtype == torch.long
    assert torch.equal(ids, real_text_tokens(tokenizer, 6000))
    text = tokenizer.decode(ids[0])
    assert "import " in text and "def " in text and "class " in text  # Python source, not noise
    assert torch.equal(real_text_tokens(tokenizer, 100), ids[:, :100])
