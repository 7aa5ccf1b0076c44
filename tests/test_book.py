"""The book builds offline with jupyter-book 1 and -W from the smoke-executed notebooks
(`test_notebooks.smoke_notebooks`), and a headless Chromium shows its pages with their plots."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from test_notebooks import load_build, smoke_notebooks

PAGES = {  # page -> the title it must render
    "book/intro.html": "ptq-bench",
    "notebooks/10_cross_bitwidth.html": "Cross-bitwidth: every method at every setting",
}


@pytest.fixture(scope="session")
def html():
    smoke = smoke_notebooks()
    return load_build().build_html(smoke["src"], smoke["build_dir"], strict=True)  # -W: warnings fail


def test_book_builds_every_page(html):
    notebooks, pages = load_build().sources()
    for page in [*notebooks, *pages]:
        assert (html / page.with_suffix(".html")).is_file(), f"{page} was not rendered"
    assert (html / "index.html").is_file()


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_embed_existing_plot_images(html, page):
    text = (html / page).read_text()
    images = re.findall(r'<img[^>]+src="([^"]+\.png)"', text)
    assert images, f"{page} has no plot image"
    from PIL import Image

    for src in images:
        with Image.open((html / page).parent / src) as image:
            assert image.width > 200 and len(image.convert("RGB").getcolors(1 << 20) or []) > 50


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def shoot(url: str, png: Path, *extra: str) -> str:
    """Screenshot `url` into `png`; returns the rendered DOM."""
    exe = chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", "--virtual-time-budget=10000",
             "--window-size=1280,2000", *extra]
    subprocess.run([exe, *flags, f"--screenshot={png}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([exe, *flags, "--dump-dom", url], check=True, capture_output=True, timeout=120, text=True)
    return dom.stdout


@pytest.mark.parametrize("page", sorted(PAGES))
def test_chromium_renders_title_and_plot(html, page, tmp_path_factory):
    if chromium() is None:
        pytest.skip("no chromium on PATH: install it with `apt-get install -y chromium` (.ci/run does)")
    import numpy as np
    from PIL import Image

    out = Path(os.environ.get("PTQ_BOOK_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    name = page.replace("/", "_").removesuffix(".html")
    url = (html / page).as_uri()
    shown, bare = out / f"{name}.png", out / f"{name}-no-images.png"
    dom = shoot(url, shown)
    shoot(url, bare, "--blink-settings=imagesEnabled=false")
    print(f"\nscreenshots: {shown} {bare}")

    assert re.search(r"<h1[^>]*>\s*" + re.escape(PAGES[page]), dom), f"{page}: title {PAGES[page]!r} not rendered"
    with Image.open(shown) as a, Image.open(bare) as b:
        a, b = np.asarray(a.convert("RGB")).astype(int), np.asarray(b.convert("RGB")).astype(int)
    pixels = a.shape[0] * a.shape[1]
    assert (a.min(axis=2) < 235).sum() > 0.02 * pixels, f"{page}: the screenshot is (nearly) blank"
    colours = len(np.unique(a.reshape(-1, 3), axis=0))
    assert colours > 500, f"{page}: {colours} colours, too few for a page with a plot"
    # the plot: what differs between the page with images and the same page without them
    changed = int((np.abs(a - b).max(axis=2) > 40).sum())
    assert changed > 0.01 * pixels, f"{page}: no plot image visible in the screenshot ({changed} pixels differ)"
