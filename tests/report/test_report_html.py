"""The HTML report opens in headless Chromium: a real screenshot with the tables and the figures.

Skipped with a reason where Chromium is absent (scripts/test.sh installs it from the system packages
where it can: apt-get, as root).
The page is probed through --dump-dom with a small script added to a copy: every embedded figure
must decode (natural size > 0) and the tables must be laid out; the screenshot must be a real,
non-uniform image in the regions where the tables and the first figure are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from report_store import build_store

WIDTH, HEIGHT = 1400, 2000
PROBE = """<script>
window.addEventListener("load", () => {
  const top = (e) => Math.round(e.getBoundingClientRect().top + window.scrollY);
  const p = document.createElement("pre");
  p.id = "probe";
  p.textContent = JSON.stringify({
    images: Array.from(document.images).map((i) => [i.naturalWidth, i.naturalHeight, top(i)]),
    tables: Array.from(document.querySelectorAll("table.report")).map((t) => [top(t), t.rows.length]),
    titles: Array.from(document.querySelectorAll("td[title]")).length,
  });
  document.body.appendChild(p);
});
</script>"""


def _chromium() -> str | None:
    for name in (os.environ.get("BENCH_CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser",
                 "google-chrome"):
        if name and (Path(name).is_file() or shutil.which(name)):
            return shutil.which(name) or name
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (scripts/test.sh installs it with apt-get when run as root; or apt-get install -y "
           "chromium)")


def _chromium_run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    from bench.report import load_results, make_filters, write_report

    root = tmp_path_factory.mktemp("html")
    build_store(root / "results")
    # two methods keep the tables short, so the first figure is inside the 2000-pixel screenshot
    results = load_results(root / "results", make_filters(methods="advcl,simclr"))
    written = write_report(results, root / "report", ("html",), tsne_n=40)
    return written.files["html"]


def test_page_is_self_contained(page):
    html = page.read_text()
    assert "<style>" in html and 'rel="stylesheet"' not in html and "<script" not in html
    assert not re.search(r'src="(?!data:image/png;base64,)', html)  # nothing fetched from outside
    # SA against RA on CIFAR-10, CIFAR-10 -> STL-10 and synthetic, against AA on the two CIFAR ones (the synthetic
    # cells have no AA); two sweep figures; one t-SNE
    assert html.count('src="data:image/png;base64,') == 8
    assert html.count('<table class="report">') == 2
    assert "81.00" in html and "paper 80.85" in html and "title=" in html
    assert '<a href="docs/fidelity.md"><code>docs/fidelity.md</code></a>' in html  # the header links the table


@needs_chromium
def test_page_renders_in_headless_chromium(page, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium_run(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table class="report">' in dom.stdout and "<img" in dom.stdout
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom.stdout)
    assert found, "the probe script did not run"
    info = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(info["images"]) == 8 and all(w > 300 and h > 200 for w, h, _ in info["images"]), info
    assert len(info["tables"]) == 2 and all(rows >= 3 for _, rows in info["tables"]), info
    assert info["titles"] > 10  # every number has its hover title

    shot = tmp_path / "report.png"
    out = _chromium_run([f"--screenshot={shot}", page.as_uri()], tmp_path / "profile2")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    keep = os.environ.get("BENCH_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, tints, plots: not a blank page
    table_top = info["tables"][0][0]
    table = pixels[table_top:table_top + 250, :900]
    assert table.std() > 20 and (table < 128).mean() > 0.01  # dark text on light cells
    figure_top = info["images"][0][2]
    assert figure_top < HEIGHT - 300, "the first figure is below the screenshot"
    figure = pixels[figure_top:min(HEIGHT, figure_top + 400), :1300]
    colored = np.abs(figure - figure.mean(axis=2, keepdims=True)).max(axis=2) > 40
    assert figure.std() > 15 and colored.mean() > 0.002  # a plot with colored markers
