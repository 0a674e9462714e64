"""Paper-like PDF building blocks on reportlab: serif type, booktabs tables, captioned figures, atomic write.

The fonts are the STIX (Times-like, with − Δ ≥ →) and DejaVu Sans Mono files that matplotlib ships, so the
PDF needs no system fonts and its text matches the figures'. Output is byte-stable (reportlab's invariant
mode: no creation date, fixed document id), so an unchanged run gives an unchanged DVC output.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER, TA_JUSTIFY, TA_LEFT, TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import cm
from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from .io import atomic_path

PAGE = A4
MARGIN = 2.0 * cm
TEXT_WIDTH = PAGE[0] - 2 * MARGIN


@lru_cache(maxsize=None)
def fonts() -> None:
    import matplotlib
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for name, file in (("Serif", "STIXGeneral"), ("Serif-Bold", "STIXGeneralBol"), ("Serif-Italic", "STIXGeneralItalic"),
                       ("Serif-BoldItalic", "STIXGeneralBolIta"), ("Mono", "DejaVuSansMono")):
        pdfmetrics.registerFont(TTFont(name, str(d / f"{file}.ttf")))
    # so <b> and <i> in paragraph markup pick the bold and italic faces
    pdfmetrics.registerFontFamily("Serif", normal="Serif", bold="Serif-Bold", italic="Serif-Italic",
                                  boldItalic="Serif-BoldItalic")


def _style(name, size, leading=None, font="Serif", **kw) -> ParagraphStyle:
    return ParagraphStyle(name, fontName=font, fontSize=size, leading=leading or size * 1.22, **kw)


STYLES = {
    "title": _style("title", 16, 19, "Serif-Bold", alignment=TA_CENTER, spaceAfter=4),
    "byline": _style("byline", 8.5, alignment=TA_CENTER, textColor=colors.HexColor("#333333")),
    "abstract_head": _style("abstract_head", 9.5, font="Serif-Bold", alignment=TA_CENTER, spaceBefore=10, spaceAfter=2),
    "abstract": _style("abstract", 9, 11.2, alignment=TA_JUSTIFY, leftIndent=1.2 * cm, rightIndent=1.2 * cm),
    "h1": _style("h1", 11.5, 14, "Serif-Bold", spaceBefore=10, spaceAfter=3, keepWithNext=1),
    "h2": _style("h2", 10, 12.5, "Serif-Bold", spaceBefore=6, spaceAfter=2, keepWithNext=1),
    "body": _style("body", 9.5, 11.8, alignment=TA_JUSTIFY, spaceAfter=4),
    "caption": _style("caption", 8.5, 10.2, alignment=TA_JUSTIFY),
    "meta": _style("meta", 8.5, 11, alignment=TA_LEFT, leftIndent=0.4 * cm, spaceAfter=5),
    "cell": _style("cell", 8.2, 9.6, alignment=TA_LEFT),
    "cell_r": _style("cell_r", 8.2, 9.6, alignment=TA_RIGHT),
    "cell_b": _style("cell_b", 8.2, 9.6, "Serif-Bold", alignment=TA_LEFT),
    "cell_br": _style("cell_br", 8.2, 9.6, "Serif-Bold", alignment=TA_RIGHT),
}


def p(markup: str, style: str = "body") -> Paragraph:
    """A paragraph of reportlab markup (<b>, <i>, <font>); record text must go through `esc` first."""
    fonts()
    return Paragraph(markup, STYLES[style])


def esc(text) -> str:
    return escape(str(text))


def mono(text) -> str:
    return f'<font face="Mono" size="7.5">{esc(text)}</font>'


def table(header: list[str] | None, rows: list[list], widths: list[float], right: set[int] = frozenset(),
          caption: str | None = None, total_rows: int = 0, extra: tuple = (), keep: bool = True):
    """A booktabs table (rules above, below the header and at the end; no vertical lines), caption above.

    Cells are strings of markup (or flowables); header None makes a key/value table; columns in `right` are
    right-aligned (numbers). The last `total_rows` rows sit below a thin rule (totals); `extra` adds TableStyle commands (e.g. SPAN).
    keep=False returns the flowables as a list, for a cell of `side_by_side` (KeepTogether cannot sit in one).
    """
    def cell(x, i, head):
        if not isinstance(x, str):
            return x
        style = {(False, False): "cell", (False, True): "cell_r", (True, False): "cell_b", (True, True): "cell_br"}
        return p(x, style[head, i in right])

    data = ([[cell(h, i, True) for i, h in enumerate(header)]] if header else []) + \
        [[cell(x, i, False) for i, x in enumerate(r)] for r in rows]
    style = [("LINEABOVE", (0, 0), (-1, 0), 0.9, colors.black), ("LINEBELOW", (0, -1), (-1, -1), 0.9, colors.black),
             ("VALIGN", (0, 0), (-1, -1), "TOP"),
             ("TOPPADDING", (0, 0), (-1, -1), 1.2), ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2),
             ("LEFTPADDING", (0, 0), (-1, -1), 3), ("RIGHTPADDING", (0, 0), (-1, -1), 3)]
    if header:
        style.append(("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black))
    if total_rows:
        style.append(("LINEABOVE", (0, -total_rows), (-1, -total_rows), 0.4, colors.black))
    t = Table(data, colWidths=widths, style=TableStyle(style + list(extra)), hAlign="CENTER", repeatRows=1 if header else 0)
    parts = [p(caption, "caption"), Spacer(1, 3)] if caption else []
    parts += [t, Spacer(1, 8)]
    return KeepTogether(parts) if keep else parts


def side_by_side(*blocks, widths: list[float]) -> Table:
    """Two tables (`table(..., keep=False)`) next to each other, top-aligned."""
    return Table([list(blocks)], colWidths=widths, style=TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0)]))


def figure(png: Path, width_in: float, caption: str) -> KeepTogether:
    """The PNG printed at the width it was drawn at (so its 8 pt text is 8 pt), caption below."""
    from PIL import Image as PILImage

    with PILImage.open(png) as im:
        w, h = im.size
    img = Image(str(png), width=width_in * 72, height=width_in * 72 * h / w)
    return KeepTogether([Spacer(1, 2), img, Spacer(1, 3), p(caption, "caption"), Spacer(1, 8)])


def _footer(canvas, doc) -> None:
    canvas.saveState()
    canvas.setFont("Serif", 8)
    canvas.drawCentredString(PAGE[0] / 2, 1.1 * cm, f"{doc.llmft_footer} · page {canvas.getPageNumber()}")
    canvas.restoreState()


def write(story: list, out_pdf: Path, title: str, footer: str) -> int:
    """Lay out `story` into out_pdf atomically (a crash leaves the previous PDF); returns the page count."""
    fonts()
    out_pdf = Path(out_pdf)
    with atomic_path(out_pdf) as tmp:
        doc = SimpleDocTemplate(str(tmp), pagesize=PAGE, leftMargin=MARGIN, rightMargin=MARGIN, topMargin=1.8 * cm,
                                bottomMargin=1.9 * cm, title=title, author="llmft", creator="llmft report",
                                invariant=1)
        doc.llmft_footer = footer
        doc.build(story, onFirstPage=_footer, onLaterPages=_footer)
    return doc.page
