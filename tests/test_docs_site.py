"""The built documentation site: API examples render as code, links work from files, nothing is
cut off by the page width; read from the HTML, then as headless Chromium renders it from files
(about 5 s; skipped where no chromium binary is found: .ci/run installs Debian's). Builds the
site once (about 20 s; or reads the build named by ``TORCHREPARAM_SITE``, as .ci/run does);
needs the docs extras."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

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


# The same pages in a real browser (headless Chromium): what the user sees, styles applied.
CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
PROBE = """<!doctype html><meta charset="utf-8"><pre id="result">no result</pre>
<iframe id="api" src="API" style="width:480px;height:800px"></iframe>
<iframe id="index" src="INDEX" style="width:480px;height:800px"></iframe>
<script>
function examples(doc) {
  // each docstring's "Example(s):" section: the code block right after its title, or null
  return [...doc.querySelectorAll("span.doc-section-title")]
    .filter((title) => /^Examples?:$/.test(title.textContent.trim()))
    .map((title) => {
      const next = (title.closest("p") || title).nextElementSibling;
      const pre = next && (next.matches("pre") ? next : next.querySelector(":scope > pre"));
      return pre && {text: pre.innerText, height: pre.getBoundingClientRect().height};
    });
}
function loose(doc) {  // doctest text the reader sees outside code
  const walk = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT);
  const out = [];
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    if (n.data.includes(">>>") && !n.parentElement.closest("pre, code")) out.push(n.data);
  }
  return out;
}
function codeBoxes(doc) {
  return [...doc.querySelectorAll("pre > code")].map((code) => {
    const style = getComputedStyle(code);
    return {whiteSpace: style.whiteSpace, overflowX: style.overflowX,
            hidden: code.scrollWidth - code.clientWidth};
  });
}
function whyTable(doc) {
  const heading = doc.getElementById("why-this-one");
  let el = heading && heading.nextElementSibling;
  while (el && el.tagName !== "H2" && !(el.matches("table") || el.querySelector("table"))) {
    el = el.nextElementSibling;
  }
  const table = el && el.tagName !== "H2" ? (el.matches("table") ? el : el.querySelector("table")) : null;
  if (!table) return null;
  return {
    height: table.getBoundingClientRect().height,
    cellDisplay: [...new Set([...table.querySelectorAll("th, td")].map((c) => getComputedStyle(c).display))],
    rows: [...table.rows].map((r) => [...r.cells].map((c) => c.innerText.trim())),
    links: [...table.querySelectorAll("a[href]")].map((a) => a.href),
  };
}
window.addEventListener("load", () => {
  const api = document.getElementById("api").contentDocument;
  const index = document.getElementById("index").contentDocument;
  document.getElementById("result").textContent = JSON.stringify({
    examples: examples(api), loose: loose(api), blockquotes: api.querySelectorAll("blockquote").length,
    code: codeBoxes(api), why: whyTable(index),
  });
});
</script>"""


@pytest.fixture(scope="module")
def seen(site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What headless Chromium renders of the API and home pages, opened from files."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("browser")
    probe = tmp / "probe.html"
    api, index = ((site / name).as_uri() for name in ("api.html", "index.html"))
    probe.write_text(PROBE.replace("API", api).replace("INDEX", index))
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += ["--allow-file-access-from-files", f"--user-data-dir={tmp / 'profile'}"]
    cmd = [CHROMIUM, *flags, "--dump-dom", probe.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert found is not None, done.stderr[-3000:]
    assert found.group(1) != "no result", "the probe's script did not run"
    result: dict[str, Any] = json.loads(unescape(found.group(1)))
    return result


def test_browser_shows_every_api_example_as_code(seen: dict[str, Any]) -> None:
    examples = seen["examples"]
    assert len(examples) == _documented_examples()
    assert None not in examples, "an Examples section whose title is not followed by code"
    for block in examples:
        assert ">>>" in block["text"], block["text"][:200]
        assert block["height"] > 0, block["text"][:200]  # shown, not collapsed
    assert seen["loose"] == []
    assert seen["blockquotes"] == 0


def test_browser_cuts_no_code_block_off(seen: dict[str, Any]) -> None:
    code = seen["code"]
    assert len(code) >= len(seen["examples"])
    assert {box["whiteSpace"] for box in code} == {"pre-wrap"}  # the site's extra.css applied
    assert [box for box in code if box["hidden"] > 0] == []  # wider than its 480 px frame


def test_browser_shows_the_why_table_with_working_links(seen: dict[str, Any], site: Path) -> None:
    why = seen["why"]
    assert why is not None, "no table under the home page's 'Why this one'"
    assert why["cellDisplay"] == ["table-cell"]  # laid out as a table, not text with pipes
    assert why["height"] > 0
    header, *rows = why["rows"]
    assert header[1:] == [
        "torchreparam",
        "torch.func.functional_call",
        "higher",
        "torchopt",
        "original torchreparam",
    ]
    assert len(rows) >= 5
    assert all(len(row) == len(header) for row in rows)
    assert len(why["links"]) >= len(rows)
    for link in why["links"]:
        url = urlsplit(link)
        assert url.scheme == "file", link
        target = Path(unquote(url.path))
        assert target.is_file(), link
        assert site.resolve() in target.parents, link
        if url.fragment:
            assert f'id="{url.fragment}"' in target.read_text(), link
