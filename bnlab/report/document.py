"""The report as a list of format-neutral blocks, so report.html and report.md say the same.

Every string in a block is plain text; the renderers (html.py, markdown.py) escape it. Nothing
a renderer prints comes from anywhere but these blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Heading:
    level: int  # 1 = title, 2 = section, 3 = subsection
    text: str
    anchor: str = ""


@dataclass
class Paragraph:
    text: str
    small: bool = False  # notes under tables and figures


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    """A numbered table. `numbered_rows` puts a '#' column first so sentences can cite rows."""

    number: int
    title: str
    head: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    numeric: list[bool] = field(default_factory=list)  # right-align these columns
    numbered_rows: bool = True
    marked: list[bool] = field(default_factory=list)  # rows to emphasise (e.g. the selected lr)
    anchor: str = ""

    @property
    def label(self) -> str:
        return f"Table {self.number}"


@dataclass
class KeyValues:
    """An unnumbered two-column listing (configuration, environment)."""

    title: str
    pairs: list[tuple[str, str]]


@dataclass
class Figure:
    number: int
    file: str  # PNG file name next to the report
    caption: str
    alt: str

    @property
    def label(self) -> str:
        return f"Figure {self.number}"


@dataclass
class Code:
    text: str
    caption: str = ""
    lang: str = ""


Block = Heading | Paragraph | Bullets | Table | KeyValues | Figure | Code


@dataclass
class Document:
    title: str
    subtitle: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    @property
    def tables(self) -> list[Table]:
        return [b for b in self.blocks if isinstance(b, Table)]

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]
