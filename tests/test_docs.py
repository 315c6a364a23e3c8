"""The documentation site builds offline with warnings as errors, and reads as it should.

The build is the one the README gives (`python -m sphinx -W --keep-going -b html docs OUT`);
it executes the tour notebook. It is made once a session (tests/docs_build.py), and
tests/test_notebook.py reads the tour as it ran there. The built site is checked as a reader
would meet it:
LinkChecker follows every internal link, image and anchor from the home page, the navigation
lists every page, and nothing is loaded from the network.
"""

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import adamax_jax
from tests.docs_build import DOCS, ROOT, make_readable, readable_tempdir, sphinx

CHECKER_CONFIG = "[AnchorCheck]\n"

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
LINKCHECKER = shutil.which("linkchecker", path=str(Path(sys.executable).parent))


def _linkcheck(start, workdir):
    assert LINKCHECKER, "linkchecker is not installed (it is in the `test` extra)"
    config = workdir / "linkcheckerrc"
    config.write_text(CHECKER_CONFIG)
    config.chmod(0o644)
    # One thread: the check is parsing HTML, which the GIL keeps to one core anyway, and
    # LinkChecker's 10 threads only contend for it (about a quarter slower).
    return subprocess.run(
        [LINKCHECKER, "-t", "0", "-f", str(config), "--no-status", "-o", "text", str(start)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def site(docs_build):
    assert docs_build.result.returncode == 0, docs_build.log()
    return docs_build.html


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(page):
    parser = _Links()
    parser.feed(page.read_text())
    return parser.tags


def _toctree_entries():
    text = (DOCS / "index.md").read_text()
    (block,) = re.findall(r"```\{toctree\}\n(.*?)```", text, re.S)
    return [line.strip() for line in block.splitlines() if line.strip() and ":" not in line]


def test_every_internal_link_image_and_anchor_resolves(site):
    result = _linkcheck(site / "index.html", site.parent)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-5000:]
    assert re.search(r"\b0 warnings found\. 0 errors found\.", report), report[-5000:]
    checked = int(re.search(r"(\d+) links in \d+ URLs checked", report).group(1))
    assert checked > 50, report[-2000:]


def test_the_link_checker_reports_broken_links_and_anchors():
    work = readable_tempdir()
    try:
        (work / "index.html").write_text(
            '<html><body><a href="other.html#there">ok</a><a href="missing.html">x</a>'
            '<img src="missing.png"><a href="other.html#nowhere">y</a></body></html>'
        )
        (work / "other.html").write_text('<html><body><p id="there">b</p></body></html>')
        make_readable(work)
        report = _linkcheck(work / "index.html", work)
        text = report.stdout + report.stderr
        assert report.returncode != 0
        assert "missing.html" in text and "missing.png" in text, text
        assert re.search(r"\b1 warning found\. 2 errors found\.", text), text
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_every_page_is_in_the_navigation(site):
    entries = _toctree_entries()
    assert {"getting_started", "algorithm", "api", "adamax_tour"} <= set(entries)
    pages = {p.stem for p in DOCS.glob("*.md")} | {"adamax_tour"}
    assert pages - {"index"} == set(entries)
    nav = {
        attrs["href"].split("#")[0]
        for tag, attrs in _tags(site / "index.html")
        if tag == "a" and "reference internal" in attrs.get("class", "") and "href" in attrs
    }
    for entry in entries:
        assert f"{entry}.html" in nav, (entry, sorted(nav))
        assert (site / f"{entry}.html").is_file(), entry


def test_every_public_name_has_an_api_entry(site):
    ids = {attrs.get("id") for _, attrs in _tags(site / "api.html")}
    for name in adamax_jax.__all__:
        assert f"adamax_jax.{name}" in ids, name
    # Parameter types read as the aliases they were written with.
    text = re.sub(r"<[^>]+>", "", (site / "api.html").read_text())
    assert "ArrayLike" in text and "DTypeLike" in text
    assert "ndarray | bool | number" not in text


def test_an_undocumented_public_name_fails_the_build():
    work = readable_tempdir()
    try:
        documented = [n for n in adamax_jax.__all__ if n != "nadamax"]
        (work / "src").mkdir()
        (work / "src" / "index.rst").write_text(
            "API\n===\n\n" + "".join(f".. py:function:: adamax_jax.{n}\n\n" for n in documented)
        )
        (work / "conf.py").write_text(
            f"import sys\nsys.path.insert(0, {str(DOCS / '_ext')!r})\nextensions = ['public_api']\n"
        )
        result = sphinx(work / "src", work / "out", conf_dir=work)
        assert result.returncode != 0
        assert "adamax_jax.nadamax" in result.stderr, result.stderr[-3000:]
        assert "adamax_jax.adamax`" not in result.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_maths_render_from_a_local_mathjax(site):
    remote = [
        (page.name, tag, attrs)
        for page in site.glob("*.html")
        for tag, attrs in _tags(page)
        if (tag == "script" and "://" in (attrs.get("src") or ""))
        or (tag == "link" and "://" in (attrs.get("href") or ""))
    ]
    assert not remote, remote[:5]
    assert (site / "_static" / "mathjax" / "MathJax.js").is_file()
    scripts = [attrs.get("src") or "" for _, attrs in _tags(site / "algorithm.html")]
    (mathjax,) = [src for src in scripts if src.startswith("_static/mathjax/MathJax.js")]
    # MathJax 2 loads the configuration named in its URL from its own config/ folder.
    (config,) = re.findall(r"[?&]config=([\w-]+)", mathjax)
    assert (site / "_static" / "mathjax" / "config" / f"{config}.js").is_file(), mathjax
    algorithm = (site / "algorithm.html").read_text()
    assert algorithm.count('class="math') >= 5
    for page in site.glob("*.html"):
        text = page.read_text()
        # A MathJax 3 configuration, or content marked for MathJax to skip, would leave
        # MathJax 2 typesetting nothing.
        assert "window.MathJax =" not in text, page.name
        assert "tex2jax_ignore" not in text and "mathjax_ignore" not in text, page.name
    # The docstrings' formulas render in the API pages too.
    assert 'class="math' in (site / "api.html").read_text()


def test_the_notebook_page_is_executed_and_shows_its_pictures(site):
    images = [attrs["src"] for tag, attrs in _tags(site / "adamax_tour.html") if tag == "img"]
    assert sum(src.endswith(".png") for src in images) >= 4, images
    assert sum(src.endswith(".gif") for src in images) == 1, images
    for src in images:
        assert (site / src).is_file(), src
    page = (site / "adamax_tour.html").read_text()
    assert "Traceback" not in page
    assert "expected (0.998, 0.01, 0.1)" in page
    # The notebook ran during the build (its committed outputs were not just copied): the
    # tour writes its animation where `ADAMAX_TOUR_GIF` says.
    assert (site.parent / "tour.gif").stat().st_size > 10_000


def _slug(title):
    # GitHub's heading anchors, which the README's links into docs/*.md use.
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_the_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 8, local
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, (link, headings)
