"""The evaluation text is real, deterministic and documented; result files round-trip."""

from __future__ import annotations

import json
import math

import pytest

from kvarn.eval.common import EvalInputError, parse_methods
from kvarn.eval.corpus import CODE_FILES, CorpusError, code_prompts, corpus_tokens, documents
from kvarn.eval.io import SuiteResult, Table, read_result, write_result
from kvarn.eval.passkey import build_prompt, default_lengths, first_number
from tests.test_eval_support import tiny_model_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_code_corpus_is_the_standard_library_in_a_fixed_order():
    docs = documents("stdlib-code")
    assert [d.name for d in docs] == list(CODE_FILES)
    assert "class ArgumentParser" in docs[0].text
    assert all(len(d.sha256) == 64 for d in docs)
    assert [d.sha256 for d in documents("stdlib-code")] == [d.sha256 for d in docs]  # deterministic


def test_docs_corpus_is_english_reference_prose():
    (doc,) = documents("stdlib-docs")
    assert "assignment statement" in doc.text.lower() and len(doc.text) > 100_000


def test_corpus_tokens_are_deterministic_and_record_their_sources(tokenizer):
    a = corpus_tokens(tokenizer, 700)
    b = corpus_tokens(tokenizer, 700)
    assert a.input_ids.shape == (1, 700) and a.input_ids.equal(b.input_ids)
    info = a.describe()
    assert info["tokens"] == 700 and info["sources"][0]["file"] == "argparse.py"
    assert tokenizer.decode(a.input_ids[0, :20]).startswith("# ===== Lib/argparse.py")


def test_unknown_corpus_and_too_few_tokens_are_errors(tokenizer):
    with pytest.raises(CorpusError, match="unknown"):
        corpus_tokens(tokenizer, 10, corpus="wikipedia")
    with pytest.raises(CorpusError, match="only"):
        corpus_tokens(tokenizer, 10**9)


def test_code_prompts_end_after_a_def_line(tokenizer):
    prompts = code_prompts(tokenizer, 7, 80)
    assert len({p.source for p in prompts}) == 7
    for p in prompts:
        assert p.input_ids.shape == (1, 80)
        assert tokenizer.decode(p.input_ids[0]).endswith(p.text_tail + "\n")
        assert p.text_tail.lstrip().startswith(("def ", "async def ")) and p.text_tail.endswith(":")


def test_passkey_prompts_fit_and_hide_the_key(tokenizer):
    for length in (300, 700):
        for depth in (0.0, 0.5, 1.0):
            ids = build_prompt(tokenizer, length, depth, 48213)
            sentence = len(tokenizer("The grass is green. ", add_special_tokens=False)["input_ids"])
            assert length - 8 - 2 * sentence <= ids.shape[1] <= length - 8
            text = tokenizer.decode(ids[0])
            assert text.count("48213") == 2 and text.endswith("The pass key is")
    assert first_number(" 48213. Remember") == 48213 and first_number("no digits") is None
    assert default_lengths(8192) == [1024, 2048, 4096, 8192] and default_lengths(3000) == [1024, 2048, 3000]


def test_parse_methods_expands_dedupes_and_applies_overrides():
    configs = parse_methods("kvarn:k4v2, kivi:k2v2,kvarn:k4v2,fp8_e4m3:k4v2,fp8_e4m3:k2v2", tile_size=64)
    assert [c.name for c in configs] == ["kvarn:k4v2/g64", "kivi:k2v2/g64", "fp8_e4m3/g64"]
    every = parse_methods("all:k2v2", keep_sink_tile=False)
    assert {c.method for c in every} == {"kvarn", "kivi", "hadamard_rtn", "varn_norot", "per_token_rtn",
                                         "fp8_e4m3", "none"}  # fmt: skip
    assert all(not c.keep_sink_tile for c in every)
    with pytest.raises(EvalInputError, match="unknown"):
        parse_methods("kvarn:k4v2,turbo")


def test_results_round_trip_and_nan_becomes_null(tmp_path):
    result = SuiteResult(
        "demo",
        {"tokens": 3},
        [Table("main", "Main", ["a", "b"], [["x", 1.5], ["y", float("nan")]]),
         Table("long", "Long", ["i"], [[i] for i in range(3)], markdown=False)],
    )  # fmt: skip
    written = write_result(result, tmp_path)
    assert {p.name for p in written} == {"demo.json", "demo.csv", "demo_long.csv", "demo.md"}
    raw = json.loads((tmp_path / "demo.json").read_text())
    assert raw["tables"][0]["rows"][1] == ["y", None]
    back = read_result(tmp_path / "demo.json")
    assert back.table("main").rows[0] == ["x", 1.5] and back.table("long").markdown is False
    markdown = (tmp_path / "demo.md").read_text()
    assert "| y | — |" in markdown and "see `demo_long.csv`" in markdown
    assert (tmp_path / "demo.csv").read_text().splitlines() == ["a,b", "x,1.5", "y,"]
    with pytest.raises(ValueError, match="does not have 2 columns"):
        Table("bad", "Bad", ["a", "b"], [[1]])
    assert math.isnan(float("nan"))
