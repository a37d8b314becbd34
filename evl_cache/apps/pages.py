"""HTML pages that work offline: the results page of a study and the pages of `explain` are built from these.

A page is one self-contained HTML file: its pictures are embedded as PNG data URIs and it loads
nothing else (no scripts, no fonts, no network), so it opens anywhere and travels as one file.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; } h3 { font-size: 1em; margin: 0.4em 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9em; max-width: 60em; }
.cards { display: flex; flex-wrap: wrap; gap: 1.2em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; flex: 1 1 560px; max-width: 100%; }
.card img { display: block; margin: 0.3em 0; }
"""


def png_bytes(figure) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def embedded_image(png: bytes | Path, alt: str) -> str:
    """An <img> whose PNG is inside the page (a data URI)."""
    data = Path(png).read_bytes() if isinstance(png, Path) else png
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """A table of text cells (escaped); cells that read as numbers are right-aligned."""
    def cell(text: str, tag: str) -> str:
        number = tag == "td" and text.replace(".", "", 1).replace("-", "", 1).isdigit()
        return f"<{tag}{' class=number' if number else ''}>{html.escape(text)}</{tag}>"

    lines = ["<table>", "<tr>" + "".join(cell(text, "th") for text in header) + "</tr>"]
    lines += ["<tr>" + "".join(cell(text, "td") for text in row) + "</tr>" for row in rows]
    return "\n".join(lines + ["</table>"])


def html_page(title: str, body: str) -> str:
    """A whole page: the title, our style sheet inline, and `body` (HTML)."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")
