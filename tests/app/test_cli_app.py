"""The serve/demo subcommands: safe defaults and argument errors."""
from __future__ import annotations

from pathlib import Path


from clipfp8.app.cli import build_parser, main
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
    assert main(["serve", "--index-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "clipfp8 serve: error:" in err and "nope" in err and "Traceback" not in err


def test_serve_dir_without_index_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--index-dir", str(tmp_path)]) == 2
    assert "clipfp8 serve: error:" in capsys.readouterr().err


def _capture_launch(monkeypatch) -> dict:
    import gradio as gr

    seen: dict = {}

    def fake_launch(self, **kwargs):
        seen.update(kwargs)
        return None

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    return seen


def test_serve_launches_loopback_with_only_the_corpus_allowed(tmp_path, monkeypatch):
    from clipfp8.app.backend import FAKE_ENCODER_ENV, fake_encoders
    from clipfp8.indexing import index_corpus

    corpus = make_corpus(tmp_path / "c", per_colour=1)
    index_corpus(corpus, tmp_path / "idx", list(fake_encoders().values()), workers=1)
    monkeypatch.setenv(FAKE_ENCODER_ENV, "1")
    seen = _capture_launch(monkeypatch)
    assert main(["serve", "--index-dir", str(tmp_path / "idx"), "--port", "7999"]) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7999 and seen["share"] is False
    # Nothing is served from disk: results go out as thumbnails; corpus and index are blocked.
    assert seen["allowed_paths"] == [] and seen["max_file_size"] == "10mb"
    assert set(seen["blocked_paths"]) == {str(corpus.resolve()), str((tmp_path / "idx").resolve())}
    assert seen["inbrowser"] is False and seen["show_error"] is False


def test_demo_prepares_then_serves_without_share(tmp_path, monkeypatch):
    import clipfp8.app.demo
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
    seen = _capture_launch(monkeypatch)
    assert main(["demo", "--no-browser", "--work-dir", str(tmp_path / "w"), "--port", "7998"]) == 0
    assert calls and calls[0].work_dir == tmp_path / "w"
    assert seen["share"] is False and seen["inbrowser"] is False and seen["server_name"] == "127.0.0.1"
    assert seen["allowed_paths"] == [] and str(corpus.resolve()) in seen["blocked_paths"]
