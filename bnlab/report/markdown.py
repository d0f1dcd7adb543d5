"""report.md: the same blocks as report.html, as GitHub-flavoured Markdown.

User text is escaped so that it stays text: HTML special characters become entities (Markdown
renderers pass raw HTML through), Markdown punctuation gets a backslash, table cells escape
'|', and code blocks use a fence longer than any run of backticks inside them.
"""

from __future__ import annotations

import html
import re

from bnlab.report.document import (
    Bullets,
    Code,
    Document,
    Figure,
    Heading,
    KeyValues,
    Paragraph,
    Table,
)

_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|])")


def md_escape(text: object) -> str:
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")


def render_markdown(doc: Document) -> str:
    parts = [f"# {md_escape(doc.title)}", "", f"*{md_escape(doc.subtitle)}*", ""]
    for b in doc.blocks:
        parts.append(_block(b))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _block(b) -> str:
    if isinstance(b, Heading):
        return f"{'#' * min(max(b.level, 2), 4)} {md_escape(b.text)}"
    if isinstance(b, Paragraph):
        return f"<sub>{md_escape(b.text)}</sub>" if b.small else md_escape(b.text)
    if isinstance(b, Bullets):
        return "\n".join(f"{i}. {md_escape(x)}" for i, x in enumerate(b.items, 1))
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, KeyValues):
        lines = [f"**{md_escape(b.title)}**", "", "| key | value |", "|---|---|"]
        lines += [f"| {md_escape(k)} | `{_code_cell(v)}` |" for k, v in b.pairs]
        return "\n".join(lines)
    if isinstance(b, Figure):
        return (f"![{md_escape(b.alt)}]({_url(b.file)})\n\n"
                f"**{b.label}.** {md_escape(b.caption)}")
    if isinstance(b, Code):
        longest = max((len(m) for m in re.findall(r"`+", b.text)), default=0)
        fence = "`" * max(3, longest + 1)
        cap = f"*{md_escape(b.caption)}*\n\n" if b.caption else ""
        return f"{cap}{fence}{b.lang}\n{b.text}\n{fence}"
    raise TypeError(f"unknown block {type(b).__name__}")


def _code_cell(v: str) -> str:
    # Inside a table, a code span still ends a cell at '|', and cannot contain a backtick.
    return str(v).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _url(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", lambda m: f"%{ord(m.group()):02X}", name)


def _table(t: Table) -> str:
    numeric = t.numeric + [False] * (len(t.head) - len(t.numeric))
    head = (["#"] if t.numbered_rows else []) + [md_escape(h) for h in t.head]
    align = (["---:"] if t.numbered_rows else []) + ["---:" if n else ":---" for n in numeric]
    lines = [f"**{t.label}.** {md_escape(t.title)}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(align) + "|"]
    for i, row in enumerate(t.rows, 1):
        marked = i <= len(t.marked) and t.marked[i - 1]
        cells = [md_escape(c) for c in row]
        if marked:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(([str(i)] if t.numbered_rows else []) + cells) + " |")
    if t.notes:
        lines.append("")
        lines += [f"<sub>{md_escape(n)}</sub>  " for n in t.notes]
    return "\n".join(lines)
