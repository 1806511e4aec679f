"""Real, offline, deterministic evaluation text: the Python standard library of this interpreter.

Why this text: the evaluation needs long natural sequences (up to the model's window, 8k tokens
for the default model) that are available without a network, identical on every run, and in a
domain the default model knows (SmolLM2 was trained on a large share of code). The interpreter
that runs kvarn ships its standard library sources and its reference documentation, so:

* ``stdlib-code`` (default): these source files of the standard library, in this order, each
  preceded by a one-line header: ``argparse.py``, ``difflib.py``, ``dataclasses.py``,
  ``statistics.py``, ``inspect.py``, ``typing.py`` (about 530 KB, well over 100k tokens).
* ``stdlib-docs``: the language-reference topics that ``pydoc`` shows
  (``pydoc_data/topics.py``, English prose), in sorted topic order.

The text depends on the Python version (files change between releases), so every result records
the Python version and the SHA-256 of each file used.
"""

from __future__ import annotations

import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

CODE_FILES: tuple[str, ...] = (
    "argparse.py",
    "difflib.py",
    "dataclasses.py",
    "statistics.py",
    "inspect.py",
    "typing.py",
)
CORPORA: tuple[str, ...] = ("stdlib-code", "stdlib-docs")
# Where in a file the divergence prompts end (fractions of the file), cycled over the files.
PROMPT_FRACTIONS: tuple[float, ...] = (0.35, 0.55, 0.75)
_DEF_LINE = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+\w+\(.*\):[ \t]*$", re.MULTILINE)


class CorpusError(RuntimeError):
    """The standard-library text cannot be read, or is too short for the request."""


@dataclass(frozen=True)
class SourceDocument:
    """One file of the corpus."""

    name: str
    path: str
    text: str
    sha256: str = field(repr=False)


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_path("stdlib"))
    if not path.is_dir():
        raise CorpusError(f"the Python standard library directory {str(path)!r} does not exist")
    return path


def _document(name: str, path: Path, text: str) -> SourceDocument:
    return SourceDocument(name, str(path), text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def code_documents() -> list[SourceDocument]:
    """The standard-library source files of ``CODE_FILES``, read as UTF-8."""
    root = stdlib_dir()
    docs = []
    for name in CODE_FILES:
        path = root / name
        if not path.is_file():
            raise CorpusError(
                f"standard-library file {str(path)!r} is missing; this interpreter ships a stripped standard "
                "library (use --corpus stdlib-docs or another Python)"
            )
        docs.append(_document(name, path, path.read_text(encoding="utf-8")))
    return docs


def docs_documents() -> list[SourceDocument]:
    """The ``pydoc`` reference topics, one document holding all topics in sorted order."""
    path = stdlib_dir() / "pydoc_data" / "topics.py"
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - only on stripped interpreters
        raise CorpusError(f"pydoc_data.topics is not available in this interpreter: {exc}") from exc
    text = "\n\n".join(f"{key}\n{'=' * len(key)}\n{topics[key].strip()}" for key in sorted(topics))
    return [_document("pydoc_data/topics.py", path, text)]


def documents(corpus: str = "stdlib-code") -> list[SourceDocument]:
    if corpus == "stdlib-code":
        return code_documents()
    if corpus == "stdlib-docs":
        return docs_documents()
    raise CorpusError(f"corpus {corpus!r} is unknown; allowed: {list(CORPORA)}")


def _header(doc: SourceDocument) -> str:
    return f"# ===== Lib/{doc.name} =====\n"


@dataclass(frozen=True)
class TokenText:
    """Token ids ``[1, n]`` of corpus text plus where they came from."""

    input_ids: torch.Tensor
    corpus: str
    sources: list[dict]

    def describe(self) -> dict:
        return {
            "corpus": self.corpus,
            "tokens": int(self.input_ids.shape[1]),
            "python": sys.version.split()[0],
            "sources": self.sources,
        }


def corpus_tokens(tokenizer, num_tokens: int, corpus: str = "stdlib-code") -> TokenText:
    """The first ``num_tokens`` tokens of the corpus (files concatenated in order)."""
    if num_tokens < 2:
        raise CorpusError(f"need at least 2 tokens of text, asked for {num_tokens}")
    pieces: list[str] = []
    used: list[dict] = []
    ids: list[int] = []
    for doc in documents(corpus):
        pieces.append(_header(doc) + doc.text)
        used.append({"file": doc.name, "sha256": doc.sha256, "chars": len(doc.text)})
        # Re-tokenize the whole concatenation: token boundaries at file joins stay those of the text.
        ids = tokenizer("\n".join(pieces), add_special_tokens=False)["input_ids"]
        if len(ids) >= num_tokens:
            break
    if len(ids) < num_tokens:
        raise CorpusError(
            f"corpus {corpus!r} has only {len(ids)} tokens with this tokenizer; asked for {num_tokens}"
        )
    return TokenText(torch.tensor([ids[:num_tokens]], dtype=torch.long), corpus, used)


@dataclass(frozen=True)
class Prompt:
    """A real code prompt: the ``prompt_tokens`` tokens of a standard-library file before a function body."""

    input_ids: torch.Tensor
    source: str
    text_tail: str


def code_prompts(tokenizer, num_prompts: int, prompt_tokens: int) -> list[Prompt]:
    """Prompts that end right after a ``def ...:`` line, so the model continues a real function body.

    Prompt ``i`` comes from file ``i % len(CODE_FILES)`` and ends at the first ``def`` line past the
    fraction ``PROMPT_FRACTIONS[(i // len(CODE_FILES)) % 3]`` of that file.
    """
    if num_prompts < 1 or prompt_tokens < 1:
        raise CorpusError(f"need num_prompts >= 1 and prompt_tokens >= 1, got {num_prompts}, {prompt_tokens}")
    docs = code_documents()
    prompts = []
    for i in range(num_prompts):
        doc = docs[i % len(docs)]
        fraction = PROMPT_FRACTIONS[(i // len(docs)) % len(PROMPT_FRACTIONS)]
        match = next((m for m in _DEF_LINE.finditer(doc.text) if m.start() >= fraction * len(doc.text)), None)
        if match is None:
            raise CorpusError(f"no function definition past {fraction:.0%} of {doc.name}")
        end = match.end() + 1  # keep the newline: the model starts the body
        ids = tokenizer(_header(doc) + doc.text[:end], add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_tokens:
            raise CorpusError(
                f"{doc.name} has only {len(ids)} tokens before offset {end}; asked for prompts of {prompt_tokens}"
            )
        line = doc.text.count("\n", 0, match.start()) + 1
        prompts.append(
            Prompt(
                torch.tensor([ids[-prompt_tokens:]], dtype=torch.long),
                f"{doc.name}:{line} (sha256 {doc.sha256[:12]})",
                match.group(0).strip(),
            )
        )
    return prompts
