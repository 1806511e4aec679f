"""A tiny random-weight Llama with a small byte-level BPE tokenizer, saved as a transformers directory.

The eval tests pass this directory as ``--model`` (no download: the weights are random and the
tokenizer is trained here on standard-library text in well under a second).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_VOCAB = 384
TINY_WINDOW = 1024


def build_tiny_model_dir(path: Path, seed: int = 0, window: int = TINY_WINDOW) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kvarn.eval.corpus import code_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([code_documents()[0].text[:20000]], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    tokenizer.clean_up_tokenization_spaces = False

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        # Larger than the default 0.02, so that attention is far from uniform and errors are visible.
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def test_tiny_model_loads_through_kvarn_loader(tiny_model_dir):
    from kvarn.eval.common import load_model_for_eval

    loaded = load_model_for_eval(str(tiny_model_dir))
    assert loaded.window == TINY_WINDOW
    ids = loaded.tokenizer("def f(x):\n    return x\n", add_special_tokens=False)["input_ids"]
    assert loaded.tokenizer.decode(ids) == "def f(x):\n    return x\n"
    assert loaded.describe()["kv_heads"] == 2
