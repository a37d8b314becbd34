"""Pages work offline: every picture is inside the page (or a local file beside it), nothing is fetched."""
import base64
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from evl_cache.apps.pages import embedded_image, html_page, html_table, png_bytes  # noqa: E402


class _Resources(HTMLParser):
    """Every address a page refers to, by tag and attribute; its text."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.found += [(tag, name, value) for name, value in attrs if name in ("src", "href", "srcset", "data")]
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.found.append((tag, "tag", ""))

    def handle_data(self, data):
        self.text.append(data)


def check_offline_page(path: Path) -> tuple[list[bytes], list[str], str]:
    """Parse a page and check it works offline: images embedded PNGs or existing local files, links local
    files that exist, no scripts or style sheets from elsewhere. Returns (the embedded PNGs, the local links,
    the page's text)."""
    parser = _Resources()
    parser.feed(path.read_text())
    images, links = [], []
    for tag, attribute, value in parser.found:
        assert attribute != "tag", f"{path}: a <{tag}> element"
        assert "://" not in value and not value.startswith("//"), f"{path}: {tag} {attribute}={value[:80]}"
        if value.startswith("data:"):
            assert tag == "img" and value.startswith("data:image/png;base64,"), value[:40]
            png = base64.b64decode(value.removeprefix("data:image/png;base64,"), validate=True)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            images.append(png)
        else:
            assert (path.parent / value.split("#")[0]).is_file(), f"{path}: {value} is not a file beside the page"
            links.append(value)
    return images, links, " ".join(" ".join(parser.text).split())


def test_a_page_embeds_its_pictures_and_escapes_its_text(tmp_path):
    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    png = png_bytes(figure)
    (tmp_path / "beside.html").write_text("<p>x</p>")
    body = html_table(["class", "probability"], [["<b>cut</b> & paste", "0.25"]]) + embedded_image(png, "a line") \
        + '<a href="beside.html">beside</a>'
    page = tmp_path / "page.html"
    page.write_text(html_page("Title <1>", body))
    images, links, text = check_offline_page(page)
    assert images == [png] and links == ["beside.html"]
    assert "<b>cut</b> & paste" in text and "Title <1>" in text and "class=number>0.25<" in page.read_text()


def test_the_check_finds_what_a_page_would_fetch(tmp_path):
    for body in ('<img src="https://example.org/a.png">', '<img src="missing.png">', "<script>1</script>",
                 '<link rel="stylesheet" href="style.css">', '<img src="data:image/png;base64,AAAA">'):
        (tmp_path / "page.html").write_text(html_page("t", body))
        with pytest.raises(AssertionError):
            check_offline_page(tmp_path / "page.html")
