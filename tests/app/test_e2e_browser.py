"""End to end: a real ``clipfp8 serve`` subprocess (FakeEncoder hook) driven by headless Chromium,
plus HTTP checks that nothing outside the corpus is served and uploads are size-limited.

Needs Debian's chromium (``apt-get install -y chromium``); never downloads a browser.
The screenshot lands in ./artifacts (ignored). docs/screenshot.png is taken from ``clipfp8 demo`` with
the real default model instead (see docs/app.md).
"""
from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.app.helpers import make_corpus

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECRET = "TOP-SECRET-NOT-IN-CORPUS"



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from clipfp8.app.backend import fake_encoders
    from clipfp8.app.testserver import serve_subprocess
    from clipfp8.indexing import index_corpus

    tmp = tmp_path_factory.mktemp("e2e")
    corpus = make_corpus(tmp / "corpus", per_colour=3)
    index_corpus(corpus, tmp / "index", list(fake_encoders().values()), workers=1)
    for secret in (tmp / "secret.txt", tmp / "cwd" / "secret.txt"):
        secret.parent.mkdir(exist_ok=True)
        secret.write_text(SECRET)
    with serve_subprocess(tmp / "index", extra_args=["--allow-reindex"], cwd=tmp / "cwd",
                          log_file=tmp / "serve.log") as url:
        yield {"url": url, "corpus": corpus.resolve(), "tmp": tmp}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_no_file_is_served_from_disk(server):
    base, corpus, tmp = server["url"], server["corpus"], server["tmp"]
    # Results go out as thumbnails: not even corpus files (nor the index DB) are reachable by path.
    for inside in (corpus / "red" / "red_0.png", tmp / "index" / "metadata.sqlite"):
        status, body = _get(f"{base}/gradio_api/file={inside}")
        assert status != 200 and body[:4] != b"\x89PNG" and b"SQLite" not in body, inside
    crafted = [str(tmp / "secret.txt"), str(tmp / "cwd" / "secret.txt"), f"{corpus}/../secret.txt",
               f"{corpus}/red/../../secret.txt", "/etc/passwd", "secret.txt",
               urllib.parse.quote(f"{corpus}/../secret.txt", safe="")]
    for path in crafted:
        status, body = _get(f"{base}/gradio_api/file={path}")
        assert status != 200 and SECRET.encode() not in body and b"root:" not in body, path


def test_uploads_are_size_limited(server):
    boundary = "clipfp8boundary"
    payload = b"0" * (11 * 2**20)  # over the 10 MB cap
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{server['url']}/gradio_api/upload", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt-get install chromium)")
def test_search_switch_precision_and_side_by_side_in_a_browser(server):
    from playwright.sync_api import sync_playwright

    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(server["url"])
            page.locator("#query textarea, #query input").first.wait_for(timeout=30000)
            page.locator("#search-btn").click()  # empty query: a short message, no traceback
            page.get_by_text("the query is empty").first.wait_for(timeout=20000)
            assert "Traceback" not in page.content()
            _search(page, "a red square", {"FP16": 1})
            assert page.locator("#gallery-a img").count() == 10
            assert "red_" in page.locator("#gallery-a").inner_text()  # captions carry file names
            assert "simulated quantization on the CPU" in page.locator("#header").inner_text()
            _assert_latency(page, ["FP16"])

            page.locator('#precision label[data-testid="FP8-radio-label"]').click()
            _search(page, "a blue square", {"FP8": 1})
            _assert_latency(page, ["FP8"])

            page.locator('#mode label[data-testid="Side by side-radio-label"]').click()
            _search(page, "a yellow square", {"FP16": 2, "FP8": 2})
            page.wait_for_selector("#gallery-b img", timeout=20000)
            page.wait_for_function("document.querySelector('#latency').innerText.includes('overlap')")
            assert page.locator("#gallery-b img").count() == 10
            _assert_latency(page, ["FP16", "FP8"])
            page.wait_for_timeout(500)  # let the latency plot redraw before the screenshot
            shot = artifacts / "app_side_by_side.png"
            page.screenshot(path=str(shot), full_page=True)
            _click_result_searches_by_image(page)
            _upload_searches_by_image(page, server["corpus"] / "green" / "green_0.png")
            _benchmark_tab(page)
            _index_tab(page)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def _search(page, text: str, counts: dict[str, int]) -> None:
    box = page.locator("#query textarea, #query input").first
    box.wait_for(timeout=30000)
    box.fill(text)
    page.locator("#search-btn").click()
    _wait_counts(page, counts)
    page.wait_for_selector("#gallery-a img", timeout=20000)


def _wait_counts(page, counts: dict[str, int]) -> None:
    """Wait until the latency table says each precision has answered exactly that many queries."""
    page.wait_for_function(
        """want => {
             const rows = document.querySelector('#latency').innerText.split('\\n').map(l => l.split('\\t'));
             return Object.entries(want).every(([p, n]) => rows.some(r => r[0] === p && r[r.length - 1] === String(n)));
           }""", arg=counts, timeout=30000)


def _assert_latency(page, labels: list[str]) -> None:
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in page.locator("#latency").inner_text().splitlines()
            if "\t" in line}
    for label in labels:
        encode_ms, search_ms, total_ms = (float(x) for x in rows[label][:3])
        assert encode_ms >= 0 and search_ms >= 0 and total_ms >= max(encode_ms, search_ms)


def _click_result_searches_by_image(page) -> None:
    page.locator("#gallery-a img").nth(2).click()
    page.wait_for_selector("#image-query img", timeout=20000)  # the clicked image became the query
    _wait_counts(page, {"FP16": 3, "FP8": 3})


def _upload_searches_by_image(page, image: Path) -> None:
    page.locator("#image-query button[aria-label='Remove Image']").first.click()  # drop the clicked result
    page.locator("#image-query input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#image-query img", timeout=20000)
    page.locator("#image-search-btn").click()
    _wait_counts(page, {"FP16": 4, "FP8": 4})
    page.wait_for_function(
        """name => [...document.querySelectorAll('#gallery-a img')]
                 .some(e => e.alt.startsWith('#1 ·') && e.alt.includes('· ' + name))""",
        arg=image.name, timeout=20000)


def _benchmark_tab(page) -> None:
    page.get_by_role("tab", name="Benchmark").click()
    page.locator("#bench-btn").click()
    page.wait_for_function("document.querySelector('#bench-result').innerText.includes('R@10')", timeout=30000)
    text = page.locator("#bench-result").inner_text()
    assert "36 queries from the corpus's captions" in text and "Δ FP8 − FP16" in text


def _index_tab(page) -> None:
    page.get_by_role("tab", name="Index").click()
    page.locator("#reindex-btn").click()
    page.wait_for_function("document.querySelector('#reindex-result').innerText.includes('unchanged')",
                           timeout=30000)
    assert "unchanged 18" in page.locator("#reindex-result").inner_text()
