"""End to end: a real ``clipfp8 serve`` subprocess (FakeEncoder hook) driven by headless Chromium,
plus HTTP checks that nothing outside the corpus is served, uploads are limited per request and
a stopped server leaves no temp files behind.

Needs Debian's chromium (``apt-get install -y chromium``); never downloads a browser.
The screenshot lands in ./artifacts (ignored). docs/screenshot.png is taken from ``clipfp8 demo`` with
the real default model instead (see docs/app.md).
"""
from __future__ import annotations

import json
import struct
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import pytest

from tests.app.helpers import make_corpus

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECRET = "TOP-SECRET-NOT-IN-CORPUS"
LONG = "red/red_2_drawn_by_someone_with_a_rather_long_descriptive_file_name.png"
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs Debian chromium at /usr/bin/chromium (apt-get install chromium)")


def _index(tmp: Path) -> tuple[Path, Path]:
    from clipfp8.app.backend import fake_encoders
    from clipfp8.indexing import index_corpus

    corpus = make_corpus(tmp / "corpus", per_colour=3)
    # One long file name without spaces: its caption must wrap, not be cut.
    caps = json.loads((corpus / "captions.json").read_text())
    caps[LONG] = caps.pop("red/red_2.png")
    (corpus / "red" / "red_2.png").rename(corpus / LONG)
    (corpus / "captions.json").write_text(json.dumps(caps))
    # A second captions file for the Benchmark tab: one colour word per folder's first image.
    rows = "".join(f"{c}/{c}_0.png,{c}\n" for c in ("red", "green", "blue", "yellow", "white", "black"))
    (corpus / "names.csv").write_text("image,caption\n" + rows)
    index_corpus(corpus, tmp / "index", list(fake_encoders().values()), workers=1)
    return corpus, tmp / "index"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from clipfp8.app.testserver import serve_subprocess

    tmp = tmp_path_factory.mktemp("e2e")
    corpus, index = _index(tmp)
    for secret in (tmp / "secret.txt", tmp / "cwd" / "secret.txt"):
        secret.parent.mkdir(exist_ok=True)
        secret.write_text(SECRET)
    (tmp / "gradio").mkdir()
    with serve_subprocess(index, extra_args=["--allow-reindex"], cwd=tmp / "cwd", log_file=tmp / "serve.log",
                          env_overrides={"GRADIO_TEMP_DIR": str(tmp / "gradio")}) as url:
        yield {"url": url, "corpus": corpus.resolve(), "tmp": tmp, "temp_base": tmp / "gradio"}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _upload(url: str, files: list[tuple[str, bytes]]) -> tuple[int, bytes]:
    """POST ``files`` to Gradio's upload route in one multipart request -> (status, body)."""
    boundary = "clipfp8boundary"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files)
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}/gradio_api/upload", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
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


def test_uploads_are_limited_per_request_not_only_per_file(server):
    status, body = _upload(server["url"], [("big.png", b"0" * (11 * 2**20))])  # over the 10 MB cap
    assert status == 413 and body.startswith(b"Upload refused: 11 MB in one upload")
    # Five files of 9 MB each: every one under the per-file cap, together far over the request cap.
    status, body = _upload(server["url"], [(f"part{i}.png", b"1" * (9 * 2**20)) for i in range(5)])
    assert status == 413
    assert body == b"Upload refused: 45 MB in one upload; the limit is 10 MB per upload, all files together."
    temp_dirs = list(server["temp_base"].glob("clipfp8-gradio-*"))
    assert len(temp_dirs) == 1  # the server's own folder, under the GRADIO_TEMP_DIR it was given
    assert not [p for p in temp_dirs[0].rglob("*") if p.is_file() and p.stat().st_size >= 9 * 2**20]


def test_a_stopped_server_leaves_no_temp_files(tmp_path):
    from clipfp8.app.testserver import serve_subprocess

    _, index = _index(tmp_path)
    (tmp_path / "gradio").mkdir()
    with serve_subprocess(index, env_overrides={"GRADIO_TEMP_DIR": str(tmp_path / "gradio")}) as url:
        for i in range(3):  # uploads never used by any search
            status, _ = _upload(url, [(f"unused{i}.png", (REPO / "docs" / "screenshot.png").read_bytes()[:50_000])])
            assert status == 200
        own = list((tmp_path / "gradio").glob("clipfp8-gradio-*"))
        assert len(own) == 1 and len([p for p in own[0].rglob("unused*.png")]) == 3
    # SIGTERM: the server's folder went with it. (Gradio itself leaves an empty vibe_edit_history folder.)
    assert not list((tmp_path / "gradio").glob("clipfp8-gradio-*"))
    assert not [p for p in (tmp_path / "gradio").rglob("*") if not p.is_dir()]


def _bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.browser
@needs_chromium
def test_the_app_in_a_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server["url"])
            _query_box(page).wait_for(timeout=30000)
            assert "red car" not in _query_box(page).get_attribute("placeholder")
            page.locator("#search-btn").click()  # empty query: a short message, no traceback
            page.get_by_text("the query is empty").first.wait_for(timeout=20000)
            assert "Traceback" not in page.content()
            _search(page, "a red square", {"FP16": 1})
            assert page.locator("#gallery-a img").count() == 10
            assert any(LONG.split("/")[1] in c for c in _captions(page))  # the long name is among them
            _assert_all_results_visible(page, "#gallery-a")
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
            _assert_all_results_visible(page, "#gallery-a")
            _assert_all_results_visible(page, "#gallery-b")
            _assert_latency(page, ["FP16", "FP8"])
            page.wait_for_timeout(500)  # let the latency plot redraw before the screenshot
            shot = artifacts / "app_side_by_side.png"
            page.screenshot(path=str(shot), full_page=True)
            _click_result_searches_by_image(page, {"FP16": 3, "FP8": 3})
            _paging(page, {"FP16": 4, "FP8": 4}, {"FP16": 5, "FP8": 5})
            _folder_filter(page, {"FP16": 6, "FP8": 6})
            _full_size_view(page, [{"FP16": n, "FP8": n} for n in (7, 8, 9)])
            _upload_searches_by_image(page, server, {"FP16": 10, "FP8": 10})
            _bad_uploads_are_refused(page, tmp_path)
            _benchmark_tab(page, tmp_path)
            _index_tab(page)
        except Exception:
            page.screenshot(path=str(artifacts / "app_failure.png"), full_page=True)  # for the failure report
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def _query_box(page):
    return page.locator("#query textarea, #query input").first


def _search(page, text: str, counts: dict[str, int]) -> None:
    box = _query_box(page)
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


def _banner(page) -> str:
    """The banner's text, without the timer Gradio shows over an output while an event runs."""
    return page.locator("#banner").inner_text().strip().splitlines()[-1]


def _captions(page, gallery: str = "#gallery-a") -> list[str]:
    return [img.get_attribute("alt") for img in page.locator(f"{gallery} img").all()]


def _assert_all_results_visible(page, gallery: str) -> None:
    """Every result, caption included, lies inside the 1400x900 window (no scrolling, page or
    gallery), and every caption lies inside its thumbnail, uncut."""
    page.wait_for_timeout(300)
    items = page.locator(f"{gallery} .thumbnail-item").all()
    assert len(items) == 10
    for item in items:
        box, cap = item.bounding_box(), item.locator(".caption-label").bounding_box()
        assert box["y"] + box["height"] <= 900, box
        assert cap["x"] >= box["x"] - 1 and cap["x"] + cap["width"] <= box["x"] + box["width"] + 1, (cap, box)
        assert cap["y"] + cap["height"] <= box["y"] + box["height"] + 1, (cap, box)
    cut = page.evaluate(f"""[...document.querySelectorAll('{gallery} .caption-label')]
                            .filter(e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1)
                            .map(e => e.innerText)""")
    assert cut == []


def _assert_latency(page, labels: list[str]) -> None:
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in page.locator("#latency").inner_text().splitlines()
            if "\t" in line}
    for label in labels:
        encode_ms, search_ms, total_ms = (float(x) for x in rows[label][:3])
        assert encode_ms >= 0 and search_ms >= 0 and total_ms >= max(encode_ms, search_ms)


def _click_result_searches_by_image(page, counts: dict[str, int]) -> None:
    name = _captions(page)[2].split(" · ")[2]
    page.locator("#gallery-a img").nth(2).click()
    _wait_counts(page, counts)
    page.wait_for_function("n => document.querySelector('#banner').innerText.includes('Results for image ' + n)",
                           arg=name, timeout=20000)
    assert _query_box(page).input_value() == f"image: {name}"
    assert _captions(page)[0].endswith(f"· {name}")  # the clicked image finds itself first
    assert page.locator("#gallery-a .thumbnail-item.selected, #gallery-b .thumbnail-item.selected").count() == 0
    page.wait_for_selector("#fullsize img", timeout=20000)  # the clicked image, full size
    assert f"folder {name.split('_')[0]}/" in page.locator("#selected-info").inner_text()


def _paging(page, after_next: dict[str, int], after_prev: dict[str, int]) -> None:
    first = _captions(page)
    page.locator("#page-next").click()
    _wait_counts(page, after_next)
    assert "results 11–18 (no more)" in _banner(page) and "Results for image" in _banner(page)
    assert [c.split(" · ")[0] for c in _captions(page)] == [f"#{i}" for i in range(11, 19)]
    assert page.locator("#page-next").is_disabled() and page.locator("#page-prev").is_enabled()
    page.locator("#page-prev").click()
    _wait_counts(page, after_prev)
    assert _captions(page) == first and "results 1–10" in _banner(page)


def _file_input(page, button: str):
    """The hidden file input of an upload button (a sibling of the button, not inside it)."""
    return page.locator(button).locator("xpath=..").locator("input[type=file]").first


def _pick(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").first.click()
    page.locator(f'{dropdown} li[data-testid="dropdown-option"][aria-label="{option}"]').click()


def _folder_filter(page, counts: dict[str, int]) -> None:
    _pick(page, "#folder", "blue")
    _wait_counts(page, counts)
    page.wait_for_function("document.querySelector('#banner').innerText.includes('in folder blue/')", timeout=20000)
    names = [c.split(" · ")[2] for c in _captions(page) + _captions(page, "#gallery-b")]
    assert len(names) == 6 and all(n.startswith("blue_") for n in names)


def _full_size_view(page, counts: list[dict[str, int]]) -> None:
    _pick(page, "#folder", "All folders")
    _wait_counts(page, counts[0])
    assert "in folder" not in _banner(page)
    page.locator('#click-action label[data-testid="Only show it-radio-label"]').click()
    banner = _banner(page)
    name = _captions(page)[1].split(" · ")[2]
    folder = name.split("_")[0]
    page.locator("#gallery-a img").nth(1).click()
    page.wait_for_function("n => document.querySelector('#selected-info').innerText.includes(n)", arg=name)
    page.wait_for_timeout(300)  # the event has finished: nothing else arrives
    info = page.locator("#selected-info").inner_text()
    assert f"folder {folder}/" in info and "20×20 px" in info and "no search" in info
    assert _banner(page) == banner  # only shown: no new search
    size = page.evaluate("document.querySelector('#fullsize img').naturalWidth")
    assert size == 20  # the original pixels, not the 256 px thumbnail
    page.locator("#show-folder").click()  # "Only folder <folder>/": sets the filter, which searches again
    _wait_counts(page, counts[1])
    assert f"in folder {folder}/" in _banner(page)
    page.locator('#click-action label[data-testid="Search by it-radio-label"]').click()
    _pick(page, "#folder", "All folders")
    _wait_counts(page, counts[2])


def _upload_searches_by_image(page, server, counts: dict[str, int]) -> None:
    image = server["corpus"] / "green" / "green_0.png"
    _file_input(page, "#image-upload").set_input_files(str(image))
    _wait_counts(page, counts)
    page.wait_for_function("document.querySelector('#banner').innerText.includes('Results for image green_0.png')",
                           timeout=20000)
    assert _query_box(page).input_value() == "image: green_0.png"
    assert _captions(page)[0].startswith("#1 ·") and _captions(page)[0].endswith("· green_0.png")
    own = next(server["temp_base"].glob("clipfp8-gradio-*"))
    assert not list(own.rglob("green_0.png"))  # the upload was deleted once decoded


def _bad_uploads_are_refused(page, tmp_path: Path) -> None:
    cases = {"notes.png": (b"these are notes, not a picture", "is not an image this app can read"),
             "bomb.png": (_bomb_png(), "is too large: over 25,000,000 pixels")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        _file_input(page, "#image-upload").set_input_files(str(tmp_path / name))
        page.get_by_text(message).first.wait_for(timeout=20000)
    assert "Traceback" not in page.content() and "null" not in page.locator(".toast-body").first.inner_text()


def _benchmark_tab(page, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Benchmark").click()
    assert "Ground truth: captions.json in the corpus" in page.locator("#bench-source-info").inner_text()
    _pick(page, "#bench-source", "names.csv")
    page.wait_for_function("document.querySelector('#bench-source-info').innerText.includes('names.csv')")
    assert "6 captions of 6 indexed images" in page.locator("#bench-source-info").inner_text()
    page.locator("#bench-btn").click()
    page.wait_for_function("document.querySelector('#bench-result').innerText.includes('R@10')", timeout=30000)
    text = page.locator("#bench-result").inner_text()
    assert "6 queries from the captions" in text and "Δ FP8 − FP16" in text and "names.csv in the corpus" in text
    upload = tmp_path / "my captions.json"
    upload.write_text(json.dumps({"red_1.png": ["red"], "blue/blue_1.png": ["blue"]}))
    _file_input(page, "#bench-upload").set_input_files(str(upload))
    page.wait_for_function("document.querySelector('#bench-source-info').innerText.includes('(uploaded)')")
    page.locator("#bench-btn").click()
    page.wait_for_function("document.querySelector('#bench-result').innerText.includes('2 queries')", timeout=30000)


def _index_tab(page) -> None:
    page.get_by_role("tab", name="Index").click()
    page.locator("#reindex-btn").click()
    page.wait_for_function("document.querySelector('#reindex-result').innerText.includes('unchanged')",
                           timeout=30000)
    assert "unchanged 18" in page.locator("#reindex-result").inner_text()
