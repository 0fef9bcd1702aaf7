"""The console script as people use it: help texts, exit codes, errors that name flags, quiet
logs, and the ``models`` listing."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from clipfp8.app import cli
from clipfp8.app.cli import (
    EXIT_AUDIT_FAILED,
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    build_parser,
    exit_code_for,
    flag_message,
    main,
)
from clipfp8.quant.cli import CLIUsageError, model_spec_from_args
from clipfp8.quant.core.config import ModelSpec

REPO = Path(__file__).resolve().parents[1]


def _parser(command: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]


def _option_help(command: str, option: str) -> str:
    """The help text argparse prints for ``option`` of ``command`` (wrapped lines joined)."""
    lines = _parser(command).format_help().split("\noptions:", 1)[1].splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(option + " ") or line.strip() == option:
            chunk = [line.strip()[len(option):]]
            for nxt in lines[i + 1:]:
                if not nxt.startswith("    "):  # the next option ("  -x") or section
                    break
                chunk.append(nxt)
            return " ".join(" ".join(chunk).split())
    raise AssertionError(f"{option} not in `clipfp8 {command} --help`")


# ----- help --------------------------------------------------------------------------------

@pytest.mark.parametrize("command, option, default", [("search", "-k K", "10"), ("serve", "--port PORT", "7860"),
                                                      ("demo", "--port PORT", "7860"),
                                                      ("index", "--batch-size BATCH_SIZE", "64"),
                                                      ("index", "--workers WORKERS", "4")])
def test_help_shows_every_default(command: str, option: str, default: str) -> None:
    assert f"(default: {default})" in _option_help(command, option)


def test_help_describes_model_forms_and_puts_maintainer_commands_last() -> None:
    text = _option_help("index", "--model NAME|CONFIG.json")
    assert "JSON open_clip config" in text and "--random-init" in text and "clipfp8 models" in text
    top = build_parser().format_help()
    commands = [m[1] for m in re.finditer(r"^    (\S+)", top, re.MULTILINE)]  # not wrapped help lines
    train = [c for c in commands if c.startswith("train")]
    assert train == ["train-prep", "train", "train-ship", "train-eval"] and commands[-4:] == train
    assert all("(maintainers)" in line for line in top.splitlines() if line.split()[:1] in (["train-prep"], ["train"]))
    assert "exit codes: 0 ok" in top and f"{EXIT_BAD_INPUT} bad input" in top


def test_verbose_flag_works_before_and_after_the_command() -> None:
    assert build_parser().parse_args(["-v", "stats", "--index-dir", "i"]).verbose == 1
    assert build_parser().parse_args(["stats", "--index-dir", "i", "-vv"]).verbose == 2
    assert build_parser().parse_args(["stats", "--index-dir", "i"]).verbose == 0


# ----- exit codes and messages -------------------------------------------------------------

def test_exit_codes_by_exception() -> None:
    from clipfp8.indexing.errors import CorpusError, IndexConfigError, IndexLockedError, StorageError
    from clipfp8.quant.core.errors import AuditError, ModelLoadError, UnsupportedPrecisionError

    assert exit_code_for(AuditError("gap")) == EXIT_AUDIT_FAILED == 4
    for e in (CorpusError("x"), ModelLoadError("x"), FileNotFoundError("x"), PermissionError("x")):
        assert exit_code_for(e) == EXIT_BAD_INPUT == 3
    for e in (CLIUsageError("x"), ValueError("x"), IndexConfigError("x")):
        assert exit_code_for(e) == EXIT_USAGE == 2
    for e in (IndexLockedError("x"), StorageError("x"), UnsupportedPrecisionError("x"), OSError(28, "No space")):
        assert exit_code_for(e) == EXIT_ERROR == 5
    assert exit_code_for(KeyboardInterrupt()) == EXIT_INTERRUPTED == 130


def test_fp8_without_quantized_names_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c").mkdir()
    rc = main(["index", str(tmp_path / "c"), "--index-dir", str(tmp_path / "i"), "--precision", "fp8-fake"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "usage: clipfp8 index" in err
    assert "--precision fp8-fake needs --quantized DIR" in err and "EncoderSpec" not in err


def test_open_clip_name_needs_weights_or_random_init(capsys: pytest.CaptureFixture) -> None:
    rc = main(["quantize", "--calib", "c", "--output", "o", "--model", "ViT-B-32"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "--pretrained TAG" in err and "--random-init" in err and "--checkpoint" in err


@pytest.mark.parametrize("argv, spec_or_error", [
    (["--model", "ViT-B-32", "--random-init"], ModelSpec(name="ViT-B-32")),
    (["--model", "ViT-B-32", "--pretrained", "openai"], ModelSpec(name="ViT-B-32", pretrained="openai")),
    (["--model", "ViT-B-32", "--checkpoint", "w.safetensors"],
     ModelSpec(name="ViT-B-32", checkpoint=Path("w.safetensors"))),
    ([], ModelSpec()),
    (["--random-init"], "--random-init need --model NAME"),
    (["--pretrained", "openai"], "need --model NAME"),
    (["--model", "ViT-B-32", "--pretrained", "openai", "--checkpoint", "w.safetensors"], "not both"),
    (["--model", "ViT-B-32", "--random-init", "--pretrained", "openai"], "contradicts"),
    (["--model", "cfg.json", "--pretrained", "openai"], "JSON config"),
])
def test_model_flags(argv: list[str], spec_or_error: ModelSpec | str) -> None:
    from clipfp8.quant.cli import add_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(argv)
    if isinstance(spec_or_error, ModelSpec):
        assert model_spec_from_args(args) == spec_or_error
    else:
        with pytest.raises(CLIUsageError, match=spec_or_error):
            model_spec_from_args(args)


def test_config_errors_are_reported_with_flag_names() -> None:
    index = _parser("index")
    assert flag_message("IndexConfig.max_pixels must be >= 1, got 0", index) == "--max-pixels must be >= 1, got 0"
    assert flag_message("IndexConfig.lookahead must be >= 0", index) == "IndexConfig.lookahead must be >= 0"
    msg = flag_message("EncoderSpec: precision 'fp8-fake' needs 'quantized' (a directory)", index)
    assert msg == "precision 'fp8-fake' needs --quantized (a directory)"
    quantize = _parser("quantize")
    assert flag_message("CalibConfig.batch_size must be >= 1", quantize) == "--calib-batch-size must be >= 1"


def test_bad_flag_value_exits_with_the_usage_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["search", "--index-dir", str(tmp_path), "--text", "x", "--batch-size", "0"])
    assert e.value.code == EXIT_USAGE and "--batch-size" in capsys.readouterr().err


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import clipfp8.indexing.cli as indexing_cli

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(indexing_cli, "cmd_stats", interrupted)
    assert main(["stats", "--index-dir", "anything"]) == EXIT_INTERRUPTED
    assert "clipfp8 stats: interrupted" in capsys.readouterr().err


def test_readme_lists_the_exit_codes() -> None:
    readme = (REPO / "README.md").read_text()
    for name in ("EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_USAGE", "EXIT_BAD_INPUT", "EXIT_AUDIT_FAILED", "EXIT_ERROR",
                 "EXIT_INTERRUPTED"):
        assert f"| {getattr(cli, name)} |" in readme, name


# ----- logging -----------------------------------------------------------------------------

@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("clipfp8").level)
    with warnings.catch_warnings():
        yield
    logging.captureWarnings(False)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("clipfp8").setLevel(saved[2])


def test_quiet_logging_keeps_our_lines_and_drops_library_noise(restore_logging, capsys) -> None:
    from clipfp8.app.cli_logging import configure_logging

    configure_logging(0)
    logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
    logging.getLogger("clipfp8.indexing.pipeline").info("indexed 3 files")
    logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
    warnings.warn("transformers 9.9 is not tested with current version of modelopt", UserWarning, stacklevel=1)
    warnings.warn("something real", UserWarning, stacklevel=1)
    lib = logging.getLogger("somelib.child")
    own = logging.StreamHandler(sys.stderr)  # a library that prints its own records and propagates
    logging.getLogger("somelib").addHandler(own)
    try:
        lib.warning("retrying")
    finally:
        logging.getLogger("somelib").removeHandler(own)
    err = capsys.readouterr().err
    assert "clipfp8: indexed 3 files" in err and "something real" in err
    assert "faiss" not in err and "CUDA runtime" not in err and "modelopt" not in err
    assert err.count("retrying") == 1


def test_verbose_logging_shows_library_info(restore_logging, capsys) -> None:
    from clipfp8.app.cli_logging import configure_logging

    configure_logging(1)
    logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
    logging.getLogger("clipfp8.x").debug("details")
    err = capsys.readouterr().err
    assert "INFO faiss.loader: Loading faiss" in err and "DEBUG clipfp8.x: details" in err


def test_a_real_start_prints_nothing_but_the_result(tmp_path: Path) -> None:
    """The console script in a fresh process: stats over a fake-encoder index imports FAISS
    (whose loader logs AVX probing) and prints only the JSON."""
    from clipfp8.indexing import index_corpus
    from clipfp8.quant.core.testing import FakeEncoder
    from tests.indexing.conftest import make_corpus

    make_corpus(tmp_path / "c", 2)
    index_corpus(tmp_path / "c", tmp_path / "i", [FakeEncoder()], workers=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "clipfp8.app.cli", "stats", "--index-dir", str(tmp_path / "i")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["images"]["total"] == 2
    assert r.stderr == ""


# ----- models -------------------------------------------------------------------------------

def test_models_lists_sizes_and_tags_without_download(tmp_path: Path, monkeypatch, capsys) -> None:
    from clipfp8.quant.catalog import list_architectures, params_cache_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    archs = {a.name: a for a in list_architectures("vit-b-32-q")}
    assert set(archs) == {"ViT-B-32-quickgelu"}
    a = archs["ViT-B-32-quickgelu"]
    # CLIP ViT-B/32: 151,277,313 parameters, 512-d embeddings, 224 px input.
    assert (a.params, a.embed_dim, a.image_size) == (151_277_313, 512, 224) and "openai" in a.tags
    assert json.loads(params_cache_file().read_text())["params"] == {"ViT-B-32-quickgelu": 151_277_313}
    by_tag = list_architectures("laion2b_s34b_b79k", params=False)
    assert [(x.name, x.tags) for x in by_tag] == [("ViT-B-32", ["laion2b_s34b_b79k"])]

    assert main(["models", "vit-b-32-q"]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-32-quickgelu" in out and "151.3M" in out and "openai" in out
    assert main(["models", "no-such-thing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("command,collecting", [("search", False), ("errors", True)])
def test_one_shot_commands_run_without_the_cyclic_gc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     command: str, collecting: bool) -> None:
    """`search` loads a model, answers and exits: the collector stays off for it (full collections
    walked the imported heap again and again); other commands run with it, and it is back after."""
    import gc

    from clipfp8.indexing import cli as indexing_cli

    seen: list[bool] = []

    def record(args: argparse.Namespace) -> int:
        seen.append(gc.isenabled())
        return 0

    monkeypatch.setattr(indexing_cli, f"cmd_{command}", record)
    argv = [command, "--index-dir", str(tmp_path)] + (["--text", "a dog"] if command == "search" else [])
    assert gc.isenabled()
    assert cli.main(argv) == 0
    assert seen == [collecting] and gc.isenabled()
    with pytest.raises(SystemExit):  # a usage error exits from parsing: the collector is back too
        cli.main([command, "--no-such-flag"])
    assert gc.isenabled()


class ProcessEnded(Exception):
    """Raised by the ``fast_exit`` fixture's stand-in for ``os._exit``."""


@dataclasses.dataclass
class FastExit:
    """What the stand-ins saw: exit codes passed to ``os._exit``; ``logging.shutdown`` calls."""

    codes: list[int] = dataclasses.field(default_factory=list)
    shutdowns: int = 0


@pytest.fixture
def fast_exit(monkeypatch: pytest.MonkeyPatch) -> FastExit:
    """``os._exit`` records its code and raises ``ProcessEnded``; ``logging.shutdown`` is recorded
    but not run (pytest's own handlers stay open); the fast exit is allowed even under a
    coverage run."""
    seen = FastExit()

    def fake_exit(rc: int) -> None:
        seen.codes.append(rc)
        raise ProcessEnded

    def fake_shutdown() -> None:
        seen.shutdowns += 1

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(logging, "shutdown", fake_shutdown)
    monkeypatch.setattr(cli, "_fast_exit_allowed", lambda: True)
    return seen


@pytest.mark.parametrize("command,exits", [("search", True), ("errors", False)])
def test_console_script_ends_one_shot_commands_without_teardown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture, fast_exit: FastExit,
                                                                command: str, exits: bool) -> None:
    """The `clipfp8` console script ends the process right after a one-shot command (`search`),
    with its output flushed and its exit code, instead of tearing the interpreter down; other
    commands return normally."""
    from clipfp8.indexing import cli as indexing_cli

    def answer(args: argparse.Namespace) -> int:
        print("0.9000\ta.jpg")
        return 3

    monkeypatch.setattr(indexing_cli, f"cmd_{command}", answer)
    argv = [command, "--index-dir", str(tmp_path)] + (["--text", "a dog"] if command == "search" else [])
    if exits:
        with pytest.raises(ProcessEnded):
            cli.console_main(argv)
        assert fast_exit.codes == [3] and fast_exit.shutdowns == 1
    else:
        assert cli.console_main(argv) == 3 and fast_exit.codes == [] and fast_exit.shutdowns == 0
    assert capsys.readouterr().out == "0.9000\ta.jpg\n"


def test_console_script_output_survives_the_fast_exit(tmp_path: Path) -> None:
    """In a real process (the module run as the console script runs it), a one-shot command's
    output reaches a pipe complete before the process ends without teardown."""
    code = ("import sys; from clipfp8.indexing import cli as c; "
            "c.cmd_search = lambda a: print('\\n'.join(f'{i}\\tx{i}.jpg' for i in range(5000))) or 0; "
            "from clipfp8.app.cli import console_main; sys.exit(console_main())")
    proc = subprocess.run([sys.executable, "-c", code, "search", "--index-dir", str(tmp_path), "--text", "a"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 5000 and lines[-1] == "4999\tx4999.jpg"


def test_fast_exit_steps_aside_for_profilers_and_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """A profiler, tracer or coverage run writes its results at exit, and CLIPFP8_FAST_EXIT=0 asks
    for the normal shutdown: then no os._exit."""
    monkeypatch.delitem(sys.modules, "coverage", raising=False)
    monkeypatch.setattr(sys, "gettrace", lambda: None)
    monkeypatch.setattr(sys, "getprofile", lambda: None)
    monkeypatch.delenv(cli.FAST_EXIT_ENV, raising=False)
    assert cli._fast_exit_allowed()
    monkeypatch.setenv(cli.FAST_EXIT_ENV, "0")
    assert not cli._fast_exit_allowed()
    monkeypatch.delenv(cli.FAST_EXIT_ENV)
    monkeypatch.setattr(sys, "getprofile", lambda: print)
    assert not cli._fast_exit_allowed()


def test_closed_output_streams_do_not_break_the_fast_exit(tmp_path: Path) -> None:
    """Started with stdout closed (`1>&-`), a one-shot command still ends with its own exit code."""
    code = ("import sys; from clipfp8.indexing import cli as c; c.cmd_search = lambda a: 4; "
            "from clipfp8.app.cli import console_main; sys.exit(console_main())")
    proc = subprocess.run([sys.executable, "-c", code, "search", "--index-dir", str(tmp_path), "--text", "a"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          pass_fds=(), close_fds=True, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 4, proc.stderr[-2000:]


def test_fast_exit_fails_when_the_output_cannot_be_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            fast_exit: FastExit) -> None:
    """Output lost at the final flush (a full disk) is an error, as Python's own shutdown makes it
    (120); a reader that went away (`| head`) is not."""
    import errno
    import io

    from clipfp8.indexing import cli as indexing_cli

    class Failing(io.StringIO):
        def __init__(self, exc: OSError) -> None:
            super().__init__()
            self.exc = exc

        def flush(self) -> None:
            raise self.exc

    monkeypatch.setattr(indexing_cli, "cmd_search", lambda args: 0)
    argv = ["search", "--index-dir", str(tmp_path), "--text", "a"]
    for exc, rc in ((OSError(errno.ENOSPC, "No space left on device"), cli.EXIT_UNFLUSHED), (BrokenPipeError(), 0)):
        monkeypatch.setattr(sys, "stdout", Failing(exc))
        with pytest.raises(ProcessEnded):
            cli.console_main(argv)
        assert fast_exit.codes.pop() == rc
