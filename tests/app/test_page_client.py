"""``app.page_client``: a served query sent as the app's web page sends it, against the real
app served in this process (fake encoders), checked against gradio_client's answer."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipfp8.app.bench_search import _free_port
from clipfp8.app.page_client import BrowserSession, ServeProtocolError, gallery_urls
from tests.app.test_cli_app import _fake_index

ARGS = ["a red square", 10, 0.0, "FP16", "Single", None]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from clipfp8.app.backend import FAKE_ENCODER_ENV, open_context
    from clipfp8.app.serving import launch
    from clipfp8.app.ui import build_ui

    mp = pytest.MonkeyPatch()
    mp.setenv(FAKE_ENCODER_ENV, "1")
    _, idx = _fake_index(Path(tmp_path_factory.mktemp("browser")))
    ctx = open_context(idx)
    demo = build_ui(ctx)
    port = _free_port()
    launch(demo, ctx, port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        mp.undo()


def _banner(outputs: list[Any], types: list[str | None]) -> list[str]:
    return [o for o, t in zip(outputs, types, strict=True) if t == "markdown" and isinstance(o, str)
            and o.startswith("**Results for")]


def test_a_query_answers_as_through_gradio_client(served: str) -> None:
    from gradio_client import Client

    with httpx.Client(timeout=30) as http:
        page = BrowserSession(http, served)
        types = page.output_types("search")
        got = page.call("search", ARGS)
        urls = gallery_urls(got[types.index("gallery")])
        assert urls and all(http.get(u).status_code == 200 for u in urls)
        ref = Client(served, verbose=False, download_files=False).predict(*ARGS, api_name="/search")
        assert len(gallery_urls(ref[0])) == len(urls)
        # The same hits, in the same order (the file names Gradio gives them differ per call).
        captions = [item.get("caption") for item in got[types.index("gallery")]["value"]]
        assert captions == [item.get("caption") for item in ref[0]["value"]] and all(captions)
        assert _banner(got, types) and _banner(got, types)[0] in ref


def test_errors_and_unknown_events_are_named(served: str) -> None:
    with httpx.Client(timeout=30) as http:
        page = BrowserSession(http, served)
        with pytest.raises(ServeProtocolError, match="query is empty|no query"):
            page.call("search", ["   ", *ARGS[1:]])
        with pytest.raises(ServeProtocolError, match="no event named 'nope'"):
            page.call("nope", [])
        with pytest.raises(ServeProtocolError, match="search takes 6 values .* got 5"):
            page.call("search", ARGS[:-1])
        assert page.call("search", ARGS)  # the session still answers after an error
