"""report.html: one self-contained page (inline CSS, no scripts) plus the PNG files next to it.

Every piece of text goes through `esc` (html.escape with quotes), whether it came from the
program or from the user (study names, labels, config values, error messages).
"""

from __future__ import annotations

import html

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

CSS = """
:root { --rule: #222; --muted: #555; }
html { background: #fff; }
body { margin: 0; color: #111; font: 16px/1.5 "Latin Modern Roman", "CMU Serif", Georgia,
       "Times New Roman", serif; }
main { max-width: 66rem; margin: 2.5rem auto 4rem; padding: 0 1.5rem; }
header { text-align: center; margin-bottom: 1.5rem; }
h1 { font-size: 1.7rem; font-weight: normal; margin: 0 0 .3rem; }
.subtitle { color: var(--muted); margin: 0; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 .6rem; padding-bottom: .15rem;
     border-bottom: 1px solid #bbb; }
h3 { font-size: 1.02rem; margin: 1.4rem 0 .4rem; }
nav { font-size: .9rem; columns: 2; margin: 0 auto 1rem; max-width: 40rem; }
nav ol { margin: 0; }
p.small, .notes p { font-size: .8rem; color: #333; margin: .25rem 0; }
ol.findings li { margin: .3rem 0; }
figure { margin: 1.4rem 0; }
figcaption { font-size: .88rem; margin: .35rem 0; }
figure.tbl figcaption { margin-bottom: .4rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.data { margin: 0 auto; font-size: .8rem; border-top: 1.5px solid var(--rule);
             border-bottom: 1.5px solid var(--rule); }
table.data thead th { font-weight: 600; border-bottom: .8px solid var(--rule);
                      padding: .3rem .55rem; vertical-align: bottom; white-space: normal; }
table.data td { padding: .18rem .55rem; vertical-align: top; }
table.data tr.marked td { font-weight: 700; }
.num { text-align: right; }
td.num { white-space: nowrap; }
#runs td:nth-child(2) { white-space: nowrap; font-family: ui-monospace, "DejaVu Sans Mono",
                        monospace; font-size: .7rem; }
.txt { text-align: left; }
td.rowno { color: var(--muted); }
.kv { margin: .3rem 0 1.1rem; font-size: .8rem; }
.kv-title { font-weight: 600; margin-bottom: .25rem; }
dl.kv-list { display: grid; grid-template-columns: max-content minmax(0, 1fr) max-content
             minmax(0, 1fr); gap: .05rem 1rem; margin: 0; }
dl.kv-list dt { color: var(--muted); white-space: nowrap; }
dl.kv-list dd { margin: 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
                font-size: .74rem; overflow-wrap: anywhere; }
figure.fig img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
pre { background: #f6f6f4; border: 1px solid #e2e2dd; padding: .7rem .9rem; font-size: .74rem;
      overflow-x: auto; line-height: 1.35; }
@media print { main { max-width: none; margin: 0; } h2 { break-after: avoid; }
               figure { break-inside: avoid; } }
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def render_html(doc: Document) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(doc.title)}</title>", f"<style>{CSS}</style>", "</head>",
             "<body>", "<main>", "<header>", f"<h1>{esc(doc.title)}</h1>",
             f'<p class="subtitle">{esc(doc.subtitle)}</p>', "</header>", _toc(doc)]
    for block in doc.blocks:
        parts.append(_block(block))
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _toc(doc: Document) -> str:
    items = [f'<li><a href="#{esc(b.anchor)}">{esc(b.text)}</a></li>'
             for b in doc.blocks if isinstance(b, Heading) and b.level == 2 and b.anchor]
    return f"<nav><ol>{''.join(items)}</ol></nav>" if items else ""


def _block(b) -> str:
    if isinstance(b, Heading):
        level = min(max(b.level, 2), 4)
        anchor = f' id="{esc(b.anchor)}"' if b.anchor else ""
        return f"<h{level}{anchor}>{esc(b.text)}</h{level}>"
    if isinstance(b, Paragraph):
        cls = ' class="small"' if b.small else ""
        return f"<p{cls}>{esc(b.text)}</p>"
    if isinstance(b, Bullets):
        items = "".join(f"<li>{esc(x)}</li>" for x in b.items)
        return f'<ol class="findings">{items}</ol>'
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, KeyValues):
        items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in b.pairs)
        return (f'<div class="kv"><div class="kv-title">{esc(b.title)}</div>'
                f'<dl class="kv-list">{items}</dl></div>')
    if isinstance(b, Figure):
        return (f'<figure class="fig" id="figure-{b.number}">'
                f'<img src="{esc(b.file)}" alt="{esc(b.alt)}">'
                f"<figcaption><b>{esc(b.label)}.</b> {esc(b.caption)}</figcaption></figure>")
    if isinstance(b, Code):
        cap = f"<figcaption>{esc(b.caption)}</figcaption>" if b.caption else ""
        return f"<figure>{cap}<pre><code>{esc(b.text)}</code></pre></figure>"
    raise TypeError(f"unknown block {type(b).__name__}")


def _table(t: Table) -> str:
    numeric = t.numeric + [False] * (len(t.head) - len(t.numeric))
    head_cells = (['<th class="num">#</th>'] if t.numbered_rows else []) + [
        f'<th class="{"num" if n else "txt"}">{esc(h)}</th>' for h, n in zip(t.head, numeric)]
    body = []
    for i, row in enumerate(t.rows, 1):
        marked = i <= len(t.marked) and t.marked[i - 1]
        cls = ' class="marked"' if marked else ""
        cells = ([f'<td class="num rowno">{i}</td>'] if t.numbered_rows else []) + [
            f'<td class="{"num" if n else "txt"}">{esc(c)}</td>' for c, n in zip(row, numeric)]
        body.append(f'<tr data-row="{i}"{cls}>{"".join(cells)}</tr>')
    notes = "".join(f"<p>{esc(n)}</p>" for n in t.notes)
    anchor = esc(t.anchor or f"table-{t.number}")
    return (f'<figure class="tbl" id="{anchor}">'
            f"<figcaption><b>{esc(t.label)}.</b> {esc(t.title)}</figcaption>"
            f'<div class="scroll"><table class="data"><thead><tr>{"".join(head_cells)}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table></div>'
            f'<div class="notes">{notes}</div></figure>')
