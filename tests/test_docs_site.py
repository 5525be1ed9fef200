"""The built documentation site: API examples render as code, links work from files, nothing is
cut off by the page width. Builds the site once (about 20 s; or reads the build named by
``TORCHREPARAM_SITE``, as .ci/run does); needs the docs extras."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the docs extras are not installed (pip install -e .[docs])")
griffe = pytest.importorskip("griffe")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TITLE = re.compile(r"^Examples?:[ \t]*$", re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = os.environ.get("TORCHREPARAM_SITE")  # a build of this checkout (.ci/run makes one)
    if built and (Path(built) / "api.html").is_file():
        return Path(built)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


class _Text(HTMLParser):
    """Text outside ``<pre>``/``<code>``, block quotes, and the examples' code blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # inside <pre> or <code>
        self.prose: list[str] = []
        self.blockquotes = 0
        self.code_examples = 0
        self._after_examples_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("pre", "code"):
            self.depth += 1
        if tag == "blockquote":
            self.blockquotes += 1
        if tag == "pre" and self._after_examples_title:
            self.code_examples += 1
            self._after_examples_title = False
        if tag == "span" and ("class", "doc-section-title") in attrs:
            self._after_examples_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "code"):
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth == 0 and data.strip():
            self.prose.append(data)
            if self._after_examples_title and data.strip() not in ("Examples:", "Example:"):
                self._after_examples_title = False  # a section title that is not Examples


def _documented_examples() -> int:
    """How many objects on the API page have an Example(s) section in their docstring."""
    package = griffe.load("torchreparam", search_paths=[str(REPO / "src")])
    names = re.findall(r"^::: torchreparam\.(\w+)", (REPO / "docs/api.md").read_text(), re.M)
    count = 0
    stack = [package[name] for name in names]
    while stack:
        obj = stack.pop()
        if obj.docstring is not None and EXAMPLE_TITLE.search(obj.docstring.value):
            count += 1
        if obj.is_class:
            stack += [m for n, m in obj.members.items() if not n.startswith("_")]
    return count


def test_every_api_example_is_a_code_block(site: Path) -> None:
    page = _Text()
    page.feed((site / "api.html").read_text())
    loose = [text for text in page.prose if ">>>" in text]
    assert loose == [], f"doctest text outside code blocks: {loose[:3]}"
    assert page.blockquotes == 0  # what '>>>' became when read as markdown
    expected = _documented_examples()
    assert expected >= 10  # (the count itself is checked, not the page's luck)
    assert page.code_examples == expected


def _links(html: str) -> list[str]:
    return re.findall(r'(?:href|src)="([^"#?]+)[^"]*"', html)


def test_links_work_when_the_site_is_opened_from_files(site: Path) -> None:
    broken = []
    for page in site.rglob("*.html"):
        if page.name == "404.html":
            continue  # served by a web server only, with links from the site's root
        for link in _links(page.read_text()):
            if re.match(r"[a-z]+:", link) or link.startswith("//"):
                continue  # another site (or mailto:, data:)
            target = (page.parent / link).resolve()
            # a folder link opens a file listing, not its index.html, from the file system
            if not target.is_file():
                broken.append(f"{page.relative_to(site)} -> {link}")
    assert broken == [], broken[:10]


def test_code_and_tables_are_not_cut_off_by_the_page_width(site: Path) -> None:
    css = (site / "stylesheets/extra.css").read_text()
    assert re.search(r"pre > code \{[^}]*white-space: pre-wrap", css)
    assert re.search(r"__scrollwrap \{[^}]*overflow-x: auto", css)
    for page in ("api.html", "benchmarks.html", "index.html"):
        assert 'href="stylesheets/extra.css"' in (site / page).read_text(), page
