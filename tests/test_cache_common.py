"""Helpers shared by the KVarNCache tests (tiny random models, a float64 attention oracle),
and tests of the helpers themselves."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvarn.config import KVarNConfig
from kvarn.fake_quant import fake_quantize_tiles
from kvarn.integrations.transformers import register

register()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and one thread does not stall when other processes
    load the cores (OpenMP barriers on a busy machine can make every op 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3")
VOCAB = 256


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A 2-layer random-weight causal LM of the given architecture (GQA 4:2, head_dim 32).

    ``initializer_range`` is large so that logits are peaked: greedy decisions of a random model
    are then not near-ties, and token agreement measures the cache rather than rounding luck.
    """
    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        config, cls = LlamaConfig(**common, head_dim=32), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = Qwen3Config(**common, head_dim=32), Qwen3ForCausalLM
    elif arch == "mistral":
        config, cls = MistralConfig(**common, head_dim=32, sliding_window=None), MistralForCausalLM
    elif arch == "gemma3":
        config = Gemma3TextConfig(
            **common,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )
        cls = Gemma3ForCausalLM
    elif arch == "phi3":
        config, cls = Phi3Config(**common, sliding_window=None), Phi3ForCausalLM
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = cls(config).eval().to(dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def plain_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Float64 softmax attention of one row: query [Hq, L, D], keys/values [Hkv, S, D], allowed [L, S]."""
    group = query.shape[0] // keys.shape[0]
    k = keys.double().repeat_interleave(group, dim=0)
    v = values.double().repeat_interleave(group, dim=0)
    scores = (query.double() @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_kv(shape, dtype=torch.float32, outliers: bool = True, generator=None) -> torch.Tensor:
    """Gaussian K/V with a few large outlier channels and tokens (as real caches have)."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    if outliers:
        x[..., 3] *= 12.0
        x[..., :, ::17, :] *= 4.0
    return x.to(dtype)


class DenseOracleLayer(DynamicLayer):
    """Dense oracle of KVarNCache's semantics, for a model running sdpa (no padding support).

    K/V stay dense; every completed tile after the sink is replaced once by
    ``kvarn.fake_quant.fake_quantize_tiles``, at the start of the NEXT update (a call's queries see
    the tiles it completes in 16 bits, later calls see them quantized). ``crop`` re-opens the tile
    it cuts into: its remaining tokens keep their dequantized values and the tile is quantized
    again when it completes (what KVarNLayer does, which keeps no 16-bit copy).
    """

    def __init__(self, quant: KVarNConfig) -> None:
        super().__init__()
        self.quant = quant
        self.final = 0  # tokens [0, final) are final (sink or quantized tiles)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        g = self.quant.tile_size
        complete = (self.get_seq_length() // g) * g
        start = max(self.final, g if self.quant.keep_sink_tile else 0)
        if complete > start:
            k_hat, v_hat = fake_quantize_tiles(
                self.keys[:, :, start:complete], self.values[:, :, start:complete], self.quant
            )
            self.keys, self.values = self.keys.clone(), self.values.clone()
            self.keys[:, :, start:complete] = k_hat
            self.values[:, :, start:complete] = v_hat
        self.final = max(self.final, complete)
        return super().update(key_states, value_states)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(int(tokens_to_remove))
        g = self.quant.tile_size
        self.final = min(self.final, (self.get_seq_length() // g) * g)


class DenseOracleCache(Cache):
    """Oracle layers for full-attention layers, transformers' 16-bit ones for sliding layers."""

    def __init__(self, config, quant: KVarNConfig) -> None:
        layers = []
        for kind in (
            config.layer_types
            if getattr(config, "layer_types", None)
            else ["full_attention"] * config.num_hidden_layers
        ):
            if kind == "full_attention":
                layers.append(DenseOracleLayer(quant))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
        super().__init__(layers=layers)


def test_plain_attention_matches_sdpa():
    torch.manual_seed(0)
    q = torch.randn(6, 5, 16, dtype=torch.float64)
    k = torch.randn(2, 9, 16, dtype=torch.float64)
    v = torch.randn(2, 9, 16, dtype=torch.float64)
    allowed = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=allowed, enable_gqa=True, scale=0.3
    )[0]
    torch.testing.assert_close(plain_attention(q, k, v, allowed, 0.3), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_build_and_run(arch):
    model = tiny_model(arch)
    logits = model(torch.randint(2, VOCAB, (1, 7))).logits
    assert logits.shape == (1, 7, VOCAB)
    assert torch.isfinite(logits).all()
