"""Collect result folders into one Markdown page and one simple HTML page (tables and plots)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kvarn.eval.common import EvalInputError
from kvarn.eval.io import RESULT_FORMAT, SuiteResult, read_result, render_html, render_markdown

SUITE_ORDER = ("accumulation", "perplexity", "divergence", "humaneval", "passkey")


def find_results(paths: list[str | Path]) -> list[tuple[Path, SuiteResult]]:
    """Every kvarn eval result JSON under the given folders (or given directly as files)."""
    found: list[tuple[Path, SuiteResult]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise EvalInputError(f"result path {str(path)!r} does not exist")
        candidates = [path] if path.is_file() else sorted(path.rglob("*.json"))
        for candidate in candidates:
            try:
                raw_json = json.loads(candidate.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(raw_json, dict) and raw_json.get("format") == RESULT_FORMAT:
                found.append((candidate, read_result(candidate)))
    if not found:
        raise EvalInputError(
            f"no kvarn eval results (*.json with format {RESULT_FORMAT!r}) under {list(map(str, paths))}"
        )

    def order(item):
        suite = item[1].suite
        return (SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER), str(item[0]))

    return sorted(found, key=order)


def replot(result: SuiteResult, out: Path) -> list:
    """Redraw a result's figures from its JSON with the current plotting code."""
    import importlib

    if result.suite not in SUITE_ORDER:
        raise EvalInputError(f"cannot replot unknown suite {result.suite!r}")
    module = importlib.import_module(f"kvarn.eval.{result.suite}")
    return module.replot(result, out)


def write_report(
    paths: list[str | Path], out_dir: str | Path, title: str = "kvarn evaluation", redraw: bool = False
) -> list[Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir`` with every result's tables and figures.

    Figures go to ``figures/<index>-<suite>/``: copied from the result folders, or redrawn from the
    JSON files (``redraw=True``; needs no model, only the saved numbers).
    """
    results = find_results(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections, prefixes = [f"# {title}", ""], []
    for index, (json_path, result) in enumerate(results):
        prefix = f"figures/{index:02d}-{result.suite}/"
        target = out / prefix
        target.mkdir(parents=True, exist_ok=True)
        if redraw:
            result.figures = replot(result, target)
        else:
            for fig in result.figures:
                source = json_path.parent / fig.file
                if source.is_file():
                    shutil.copyfile(source, target / fig.file)
        prefixes.append(prefix)
        sections += [
            f"<!-- from {json_path} -->",
            render_markdown(result, heading_level=2, image_prefix=prefix),
            "",
        ]
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(sections))
    html_path.write_text(render_html([r for _, r in results], title, prefixes))
    return [md_path, html_path]
