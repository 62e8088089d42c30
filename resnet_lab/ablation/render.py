"""The report's two renderings of its Sections: Markdown (report.md) and a self-contained
HTML page (report.html, images inlined). Notes are written in Markdown's inline syntax
(`code`, **bold**), which the HTML page renders rather than shows."""

from __future__ import annotations

import html
import re
from pathlib import Path

from .study import Section


def inline(text: str) -> str:
    """Markdown's inline `code` and **bold** as HTML, the rest escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def markdown(title: str, preface: list[str], sections: list[Section]) -> str:
    out = [f"# {title}\n", *[p + "\n" for p in preface]]
    for s in sections:
        out.append(f"## {s.title}\n")
        out += [p + "\n" for p in s.notes]
        out += [f"- `{i}`" for i in s.items] + ([""] if s.items else [])
        if s.table is not None:
            out.append(_md_table(*s.table))
        out += [p + "\n" for p in s.after]
        out += [f"![{p}]({p})\n" for p in s.images]
    return "\n".join(out)


def page(title: str, preface: list[str], sections: list[Section], out: Path) -> str:
    """A self-contained HTML page (images inlined)."""
    import base64

    e = html.escape
    body = [f"<h1>{e(title)}</h1>", *[f"<p>{inline(p)}</p>" for p in preface]]
    for s in sections:
        body.append(f"<h2>{e(s.title)}</h2>")
        body += [f"<p>{inline(p)}</p>" for p in s.notes]
        if s.items:
            body.append("<ul>" + "".join(f"<li><code>{e(i)}</code></li>" for i in s.items) + "</ul>")
        if s.table is not None:
            body.append(_html_table(*s.table))
        body += [f"<p>{inline(p)}</p>" for p in s.after]
        for p in s.images:
            data = base64.b64encode((out / p).read_bytes()).decode()
            body.append(f'<h3>{e(p)}</h3><img alt="{e(p)}" src="data:image/png;base64,{data}"/>')
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title><style>{style}</style>'
        f"</head><body>\n" + "\n".join(body) + "\n</body></html>"
    )


def _md_table(head: list[str], body: list[list[str]]) -> str:
    if not head:
        return "_not run_\n"
    cell = lambda c: c.replace("|", "\\|")  # noqa: E731 (a literal pipe would split the cell)
    lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _html_table(head: list[str], body: list[list[str]]) -> str:
    if not head:
        return "<p><em>not run</em></p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{trs}</table>"
