"""The serve/demo subcommands: safe defaults, argument errors, the URL they announce."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest

import clipfp8.app.demo
from clipfp8.app.cli import EXIT_BAD_INPUT, EXIT_ERROR, build_parser, main
from tests.app.helpers import make_corpus


def test_serve_defaults_to_loopback_without_a_share_link():
    args = build_parser().parse_args(["serve", "--index-dir", "/x"])
    assert (args.host, args.port, args.share, args.quantized) == ("127.0.0.1", 7860, False, None)
    assert args.index_dir == Path("/x") and args.func.__name__ == "_serve_cmd"
    args = build_parser().parse_args(["serve", "--index-dir", "/x", "--share", "--quantized", "/q"])
    assert args.share is True and args.quantized == Path("/q")


def test_demo_defaults():
    args = build_parser().parse_args(["demo", "--no-browser", "--port", "7999"])
    assert args.no_browser and args.port == 7999 and args.host == "127.0.0.1"
    assert args.work_dir.parts[-2:] == ("clipfp8", "demo")


def test_serve_missing_index_dir_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--index-dir", str(tmp_path / "nope")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "clipfp8 serve: error:" in err and "nope" in err and "Traceback" not in err


def test_serve_dir_without_index_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--index-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "clipfp8 serve: error:" in capsys.readouterr().err


def _capture_launch(monkeypatch, url: str | None = None, error: Exception | None = None) -> dict:
    """Replace gr.Blocks.launch: record its arguments; like Gradio, set ``local_url`` once
    "bound" (``url``), or raise ``error``. The start-up heap freeze is counted in
    ``seen["froze"]`` instead of freezing the test process's heap."""
    import gradio as gr

    from clipfp8.app import serving

    seen: dict = {"froze": 0}
    monkeypatch.setattr(serving, "_freeze_startup_heap", lambda: seen.__setitem__("froze", seen["froze"] + 1))

    def fake_launch(self, **kwargs):
        seen.update(kwargs)
        if error is not None:
            raise error
        self.local_url = url
        return None

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    return seen


def _fake_index(tmp_path: Path) -> tuple[Path, Path]:
    from clipfp8.app.backend import fake_encoders
    from clipfp8.indexing import index_corpus

    corpus = make_corpus(tmp_path / "c", per_colour=1)
    index_corpus(corpus, tmp_path / "idx", list(fake_encoders().values()), workers=1)
    return corpus, tmp_path / "idx"


def test_serve_launches_loopback_with_only_the_corpus_allowed(tmp_path, monkeypatch):
    from clipfp8.app.backend import FAKE_ENCODER_ENV

    corpus, idx = _fake_index(tmp_path)
    monkeypatch.setenv(FAKE_ENCODER_ENV, "1")
    seen = _capture_launch(monkeypatch)
    assert main(["serve", "--index-dir", str(idx), "--port", "7999"]) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7999 and seen["share"] is False
    # Nothing is served from disk: results go out as thumbnails; corpus and index are blocked.
    assert seen["allowed_paths"] == []
    assert set(seen["blocked_paths"]) == {str(corpus.resolve()), str(idx.resolve())}
    assert seen["inbrowser"] is False and seen["show_error"] is False
    assert seen["froze"] == 1  # `serve` is the server process: its start-up heap is frozen


def test_serve_prints_the_url_once_gradio_has_bound_it(tmp_path, monkeypatch, capsys):
    from clipfp8.app.backend import FAKE_ENCODER_ENV

    _, idx = _fake_index(tmp_path)
    monkeypatch.setenv(FAKE_ENCODER_ENV, "1")
    _capture_launch(monkeypatch, url="http://127.0.0.1:7999/")
    assert main(["serve", "--index-dir", str(idx), "--port", "7999"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if "http://" in line]
    assert lines == [f"clipfp8: serving {(tmp_path / 'c').resolve()} on http://127.0.0.1:7999/ (Ctrl+C to stop)"]
    assert "clipfp8: stopped" in err


def test_serve_port_in_use_names_the_flag(tmp_path, monkeypatch, capsys):
    from clipfp8.app.backend import FAKE_ENCODER_ENV

    _, idx = _fake_index(tmp_path)
    monkeypatch.setenv(FAKE_ENCODER_ENV, "1")
    gradio_error = OSError("Cannot find empty port in range: 7999-7999. You can specify a different port by "
                           "setting the GRADIO_SERVER_PORT environment variable or passing the `server_port`")
    _capture_launch(monkeypatch, error=gradio_error)
    assert main(["serve", "--index-dir", str(idx), "--port", "7999"]) == EXIT_ERROR
    out, err = capsys.readouterr()
    assert "--port 7999 is in use" in err and "GRADIO_SERVER_PORT" not in err and "http://" not in out


def test_demo_prepares_then_serves_without_share(tmp_path, monkeypatch, capsys):
    from clipfp8.app.backend import fake_encoders
    from clipfp8.indexing import index_corpus

    corpus = make_corpus(tmp_path / "c", per_colour=1)
    encs = fake_encoders()
    index_corpus(corpus, tmp_path / "w" / "index", list(encs.values()), workers=1)
    calls = []

    def fake_prepare(cfg, progress=None):
        calls.append(cfg)
        return cfg.index_dir, encs

    monkeypatch.setattr(clipfp8.app.demo, "prepare_demo", fake_prepare)
    seen = _capture_launch(monkeypatch, url="http://127.0.0.1:7998/")
    assert main(["demo", "--no-browser", "--work-dir", str(tmp_path / "w"), "--port", "7998"]) == 0
    assert calls and calls[0].work_dir == tmp_path / "w"
    assert seen["share"] is False and seen["inbrowser"] is False and seen["server_name"] == "127.0.0.1"
    assert seen["allowed_paths"] == [] and str(corpus.resolve()) in seen["blocked_paths"]
    assert "clipfp8: demo on http://127.0.0.1:7998/ (Ctrl+C to stop)" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["nvidia", "cuda:x"])
def test_demo_rejects_a_bad_device_as_a_usage_error(device, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["demo", "--device", device])
    assert e.value.code == 2 and "--device" in capsys.readouterr().err


def test_demo_on_a_folder_of_ones_own(tmp_path, monkeypatch):
    """``demo --corpus``: the user's folder is calibrated on and indexed, in an index of its own
    (the bundled samples keep theirs); a folder that is not one is refused by name."""
    from clipfp8.app.demo import DemoConfig

    corpus = make_corpus(tmp_path / "mine", per_colour=1)
    calls = []
    monkeypatch.setattr(clipfp8.app.demo, "prepare_demo", lambda cfg, progress=None: calls.append(cfg) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["demo", "--no-browser", "--work-dir", str(tmp_path / "w"), "--corpus", str(corpus)])
    cfg = calls[0]
    assert cfg.corpus == corpus and cfg.index_dir.parent == tmp_path / "w"
    assert cfg.index_dir != DemoConfig(work_dir=tmp_path / "w").index_dir == tmp_path / "w" / "index"
    with pytest.raises(NotADirectoryError, match="nowhere"):
        DemoConfig(work_dir=tmp_path / "w", corpus=tmp_path / "nowhere")


def test_demo_progress_bar_keeps_tqdms_redraw_interval() -> None:
    """The demo's indexing bar, fed once per file, redraws at tqdm's pace (every 0.1 s), not once
    per file: 2,000 fast calls must not write 2,000 lines into a log that is not a terminal."""
    import io

    from clipfp8.app.cli_app import _tqdm_progress

    out = io.StringIO()
    cb = _tqdm_progress(file=out)
    for done in range(1, 2001):
        cb(done, 2000)
    draws = out.getvalue().count("\r")
    assert 1 <= draws < 200
    assert out.getvalue().rsplit("\r", 1)[-1].lstrip().startswith("indexing: 100%")  # the end is shown
    assert "2000/2000" in out.getvalue().rsplit("\r", 1)[-1]
    # Closed at the end: nothing is drawn again later (e.g. when the bar would be collected).
    ends = out.getvalue()
    gc.collect()
    assert out.getvalue() == ends and ends.endswith("\n")


def test_bench_times_a_served_query_with_its_thumbnails(tmp_path, monkeypatch):
    """``time_serve`` against a real ``clipfp8 serve`` process (fake encoders): the answer, then
    every thumbnail of the gallery fetched as a browser would."""
    from clipfp8.app.backend import FAKE_ENCODER_ENV
    from clipfp8.app.bench_search import time_serve

    _, idx = _fake_index(tmp_path)
    monkeypatch.setenv(FAKE_ENCODER_ENV, "1")
    got = time_serve(idx, "FP16", ["--device", "cpu"], timeout=120)
    assert "error" not in got, got
    assert got["ready_s"] > 0 and got["command"].startswith("clipfp8 serve --index-dir")
    n = len(list(Path(idx).parent.joinpath("c").rglob("*.png")))
    for which in ("first", "second"):
        assert got[f"{which}_images"] == min(10, n)  # every hit's thumbnail was fetched
        assert 0 < got[f"{which}_answer_ms"] <= got[f"{which}_query_ms"]


def test_the_context_answers_one_query_per_encoder_before_serving(tmp_path, monkeypatch):
    from clipfp8.app.backend import FAKE_ENCODER_ENV, open_context

    _, idx = _fake_index(tmp_path)
    monkeypatch.setenv(FAKE_ENCODER_ENV, "1")
    ctx = open_context(idx)
    calls: list[tuple[str, int]] = []
    real = ctx.index.query
    monkeypatch.setattr(ctx.index, "query", lambda enc, q, k, threshold: calls.append((enc.name, k)) or real(enc, q, k, threshold))
    took = ctx.warm_up()
    assert set(took) == set(ctx.encoders) and all(t >= 0 for t in took.values())
    assert calls == [(e.name, 1) for e in ctx.encoders.values()]
    seen = _capture_launch(monkeypatch)
    warmed: list[bool] = []
    monkeypatch.setattr(type(ctx), "warm_up", lambda self: warmed.append(True) or {})
    from clipfp8.app.serving import launch
    from clipfp8.app.ui import build_ui

    launch(build_ui(ctx), ctx, port=7998, block=False)
    assert warmed == [True] and seen["server_port"] == 7998
    assert seen["froze"] == 0  # not blocking: the caller's process, whose heap is not ours to freeze
    launch(build_ui(ctx), ctx, port=7997, block=True)  # the fake server is not running: returns at once
    assert warmed == [True, True] and seen["froze"] == 1
