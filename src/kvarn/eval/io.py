"""Result files: one JSON (everything), one CSV per table, one Markdown summary, plots alongside.

A suite returns a :class:`SuiteResult`; :func:`write_result` writes ``<suite>.json``,
``<suite>.csv`` (first table) and ``<suite>_<table>.csv`` (others), and ``<suite>.md``. The report
suite reads the JSON files back (:func:`read_result`) and renders them together.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULT_FORMAT = "kvarn-eval/1"


@dataclass
class Table:
    """A titled table: ``key`` names its CSV file, ``columns`` its header."""

    key: str
    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""
    # Long tables (per chunk, per layer) go to CSV and JSON only; the Markdown names the CSV instead.
    markdown: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9_]+", self.key):
            raise ValueError(f"table key {self.key!r} must be lowercase letters, digits and underscores")
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.key!r}: row {row!r} does not have {len(self.columns)} columns")


@dataclass
class Figure:
    file: str
    caption: str


@dataclass
class SuiteResult:
    suite: str
    settings: dict
    tables: list[Table]
    figures: list[Figure] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self, key: str) -> Table:
        for table in self.tables:
            if table.key == key:
                return table
        raise KeyError(f"{self.suite} result has no table {key!r}; it has {[t.key for t in self.tables]}")

    def to_json(self) -> dict:
        return {"format": RESULT_FORMAT, **asdict(self)}


def _clean(value):
    """JSON-safe values: NaN and infinities become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def format_cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def csv_name(suite: str, table: Table, first: bool) -> str:
    return f"{suite}.csv" if first else f"{suite}_{table.key}.csv"


def write_result(result: SuiteResult, out_dir: str | Path) -> list[Path]:
    """Write JSON, CSVs and the Markdown summary; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / f"{result.suite}.json"
    path.write_text(json.dumps(_clean(result.to_json()), indent=1, allow_nan=False) + "\n")
    written.append(path)
    for i, table in enumerate(result.tables):
        path = out / csv_name(result.suite, table, i == 0)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(table.columns)
            for row in table.rows:
                writer.writerow(["" if v is None else v for v in _clean(row)])
        written.append(path)
    path = out / f"{result.suite}.md"
    path.write_text(render_markdown(result))
    written.append(path)
    return written


def read_result(path: str | Path) -> SuiteResult:
    raw = json.loads(Path(path).read_text())
    if raw.get("format") != RESULT_FORMAT:
        raise ValueError(f"{path} is not a kvarn eval result (format {raw.get('format')!r})")
    return SuiteResult(
        suite=raw["suite"],
        settings=raw["settings"],
        tables=[Table(**t) for t in raw["tables"]],
        figures=[Figure(**f) for f in raw.get("figures", [])],
        data=raw.get("data", {}),
        notes=raw.get("notes", []),
    )


def markdown_table(table: Table) -> str:
    lines = [
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def settings_lines(settings: dict) -> list[str]:
    """Short human summary of the settings (the JSON keeps everything)."""
    lines = []
    model = settings.get("model", {})
    if model:
        lines.append(
            f"- model: {model.get('source')} ({model.get('layers')} layers, {model.get('query_heads')} query / "
            f"{model.get('kv_heads')} KV heads, head_dim {model.get('head_dim')}, window {model.get('window')}, "
            f"{model.get('dtype')})"
        )
    for key in sorted(settings):
        if key in ("model", "environment", "methods", "text"):
            continue
        lines.append(f"- {key}: {settings[key]}")
    if "methods" in settings:
        lines.append("- methods: " + ", ".join(m["name"] for m in settings["methods"]))
    text = settings.get("text")
    if text:
        files = ", ".join(f"{s['file']} ({s['sha256'][:12]})" for s in text.get("sources", []))
        lines.append(
            f"- text: {text.get('corpus')}, {text.get('tokens')} tokens, Python {text.get('python')}: {files}"
        )
    env = settings.get("environment", {})
    if env:
        lines.append(
            f"- measured: {env.get('date')} on {env.get('processor')} ({env.get('cpu_count')} CPUs, "
            f"{env.get('torch_threads')} torch threads, GPU {env.get('cuda') or 'none'}), torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}, kvarn {env.get('kvarn_commit')}"
        )
    if "wall_seconds" in settings:
        lines.append(f"- wall time: {settings['wall_seconds']:.0f} s")
    return lines


def render_markdown(result: SuiteResult, heading_level: int = 1, image_prefix: str = "") -> str:
    h = "#" * heading_level
    parts = [f"{h} kvarn eval {result.suite}", "", *settings_lines(result.settings), ""]
    for note in result.notes:
        parts += [f"> {note}", ""]
    for i, table in enumerate(result.tables):
        parts += [f"{h}# {table.title}", ""]
        if table.note:
            parts += [table.note, ""]
        if table.markdown:
            parts += [markdown_table(table), ""]
        else:
            parts += [f"({len(table.rows)} rows: see `{csv_name(result.suite, table, i == 0)}`)", ""]
    for fig in result.figures:
        parts += [f"![{fig.caption}]({image_prefix}{fig.file})", "", f"*{fig.caption}*", ""]
    return "\n".join(parts)


def render_html(results: list[SuiteResult], title: str, image_prefixes: list[str]) -> str:
    """A dependency-free HTML page with the same content as the Markdown report."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for result, prefix in zip(results, image_prefixes, strict=True):
        body.append(f"<h2>{esc(result.suite)}</h2><ul>")
        body += [f"<li>{esc(line[2:])}</li>" for line in settings_lines(result.settings)]
        body.append("</ul>")
        for note in result.notes:
            body.append(f"<blockquote>{esc(note)}</blockquote>")
        for i, table in enumerate(result.tables):
            body.append(f"<h3>{esc(table.title)}</h3>")
            if table.note:
                body.append(f"<p>{esc(table.note)}</p>")
            if not table.markdown:
                body.append(
                    f"<p>({len(table.rows)} rows: see {esc(csv_name(result.suite, table, i == 0))})</p>"
                )
                continue
            body.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr>")
            for row in table.rows:
                body.append("<tr>" + "".join(f"<td>{esc(format_cell(v))}</td>" for v in row) + "</tr>")
            body.append("</table>")
        for fig in result.figures:
            src = esc(prefix + fig.file)
            body.append(
                f'<figure><img src="{src}" alt="{esc(fig.caption)}"><figcaption>{esc(fig.caption)}</figcaption></figure>'
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}"
        "th{background:#eee}img{max-width:100%}figure{margin:1em 0}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
