"""The report's index.html: one self-contained page with relative links, so it opens from disk or an MLflow artifact view."""

from __future__ import annotations

from html import escape
from pathlib import Path
from urllib.parse import quote

SECTIONS = (  # file suffix → section heading, in page order
    (".md", "Tables (Markdown)"),
    (".parquet", "Data (Parquet)"),
    (".json", "Data (JSON)"),
    (".svg", "Figures (SVG)"),
)


def index_page(experiment: str, out: Path, files: list[Path], missing: list[str], verdict_lines: list[str]) -> str:
    """The page: what is missing, the verdicts, every PNG figure inline, then links to every file by kind."""
    def link(path: Path) -> str:
        rel = path.relative_to(out).as_posix()
        return f'<a href="{quote(rel)}">{escape(rel)}</a>'

    parts = [f"<h1>xfer report: {escape(experiment)}</h1>"]
    if missing:
        parts.append("<h2>Missing</h2><p>This report is partial; these parts could not be made:</p><ul>"
                     + "".join(f"<li>{escape(m)}</li>" for m in missing) + "</ul>")
    parts.append("<h2>Verdicts</h2><ul>" + "".join(f"<li>{escape(v)}</li>" for v in verdict_lines) + "</ul>"
                 if verdict_lines else "<h2>Verdicts</h2><p>No claim could be tested.</p>")
    figures = [p for p in files if p.suffix == ".png"]
    if figures:
        parts.append("<h2>Figures</h2>" + "".join(
            f'<figure>{link(p)}<br><img src="{quote(p.relative_to(out).as_posix())}" alt="{escape(p.stem)}" '
            'style="max-width:100%"></figure>' for p in figures))
    for suffix, heading in SECTIONS:
        chosen = [p for p in files if p.suffix == suffix]
        if chosen:
            parts.append(f"<h2>{heading}</h2><ul>" + "".join(f"<li>{link(p)}</li>" for p in chosen) + "</ul>")
    body = "\n".join(parts)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>xfer report: {escape(experiment)}'
            f'</title><style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}</style></head>'
            f"<body>\n{body}\n</body></html>\n")
