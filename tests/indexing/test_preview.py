"""``search --preview``: the contact sheet (geometry, one tile per hit in rank order) and the
inline-image escape sequences of kitty and iTerm2."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfp8.indexing.preview import (
    KITTY_CHUNK,
    MISSING,
    PreviewItem,
    SheetLayout,
    contact_sheet,
    iterm2_escape,
    kitty_escape,
    png_bytes,
    show_preview,
    terminal_protocol,
)

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 220, 20), (200, 30, 200), (20, 200, 200), (90, 60, 30)]


def _solid(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> Path:
    Image.new("RGB", size, rgb).save(path)
    return path


def _items(tmp_path: Path, n: int) -> list[PreviewItem]:
    return [PreviewItem(_solid(tmp_path / f"h{i}.png", COLOURS[i]), i + 1, 0.9 - i / 10, f"dir/h{i}.png")
            for i in range(n)]


def test_contact_sheet_has_one_tile_per_hit_in_rank_order(tmp_path: Path) -> None:
    lay = SheetLayout(tile=48, caption=20, pad=4, columns=3)
    items = _items(tmp_path, 7)
    sheet = contact_sheet(items, lay)
    # 3 columns x 3 rows: width 3*(48+4)+4, height 3*(48+20+4)+4
    assert sheet.size == lay.size(7) == (160, 220)
    arr = np.asarray(sheet)
    for i, rgb in enumerate(COLOURS):
        left, top, right, bottom = lay.box(i)
        assert tuple(arr[(top + bottom) // 2, (left + right) // 2]) == rgb, i
    # the eighth and ninth slots stay empty (background)
    left, top, right, bottom = lay.box(8)
    assert tuple(arr[(top + bottom) // 2, (left + right) // 2]) == (250, 250, 250)
    # captions are drawn: dark pixels under the first tile
    left, top, right, bottom = lay.box(0)
    assert (arr[bottom + 2:bottom + lay.caption, left:right] < 100).all(axis=2).any()


def test_unreadable_hit_gets_a_grey_tile(tmp_path: Path) -> None:
    lay = SheetLayout(tile=32, caption=0, pad=2, columns=2)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    sheet = contact_sheet([*_items(tmp_path, 1), PreviewItem(bad, 2, 0.1, "bad.png")], lay)
    left, top, right, bottom = lay.box(1)
    assert sheet.size == (70, 36) and sheet.getpixel(((left + right) // 2, (top + bottom) // 2)) == MISSING


def test_kitty_escape_chunks_and_round_trips() -> None:
    png = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    seq = kitty_escape(png)
    parts = re.findall(r"\x1b_G([^;]*);([^\x1b]*)\x1b\\", seq)
    assert "".join(f"\x1b_G{k};{d}\x1b\\" for k, d in parts) == seq and len(parts) > 1
    assert parts[0][0] == "a=T,f=100,m=1" and [k for k, _ in parts[1:-1]] == ["m=1"] * (len(parts) - 2)
    assert parts[-1][0] == "m=0" and all(len(d) <= KITTY_CHUNK for _, d in parts)
    assert base64.standard_b64decode("".join(d for _, d in parts)) == png


def test_iterm2_escape_round_trips() -> None:
    png = png_bytes(Image.new("RGB", (5, 5), (1, 2, 3)))
    m = re.fullmatch(r"\x1b\]1337;File=name=([^;]+);size=(\d+);inline=1;preserveAspectRatio=1:([^\x07]+)\x07",
                     iterm2_escape(png, "p.png"))
    assert m and base64.b64decode(m[1]) == b"p.png" and int(m[2]) == len(png) and base64.b64decode(m[3]) == png


@pytest.mark.parametrize("env, expected", [
    ({"TERM": "xterm-kitty"}, "kitty"), ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "1"}, "kitty"),
    ({"TERM_PROGRAM": "WezTerm"}, "kitty"), ({"TERM_PROGRAM": "iTerm.app"}, "iterm2"),
    ({"LC_TERMINAL": "iTerm2", "TERM": "xterm-256color"}, "iterm2"), ({"TERM": "xterm-256color"}, None),
    ({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-0/default,1,0"}, None), ({"TERM": "screen-256color"}, None),
])
def test_terminal_detection(env: dict[str, str], expected: str | None) -> None:
    assert terminal_protocol(env) == expected


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_preview_inline_on_a_kitty_tty_else_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = _items(tmp_path, 2)
    tty = _Tty()
    assert show_preview(items, None, stream=tty, env={"TERM": "xterm-kitty"}) is None
    assert tty.getvalue().startswith("\x1b_Ga=T,f=100,")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = show_preview(items, None, stream=io.StringIO(), env={"TERM": "xterm-kitty"})  # not a tty
    assert path == tmp_path / "clipfp8-preview.png" and Image.open(path).size == SheetLayout().size(2)
    out = tmp_path / "sheet.png"
    assert show_preview(items, out, stream=_Tty(), env={"TERM": "xterm-kitty"}) == out and out.is_file()


def test_search_preview_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    from clipfp8.app.cli import main
    from tests.indexing.conftest import make_corpus

    monkeypatch.setenv("CLIPFP8_TEST_FAKE_ENCODER", "1")
    make_corpus(tmp_path / "c", 5)
    idx = str(tmp_path / "idx")
    assert main(["index", str(tmp_path / "c"), "--index-dir", idx, "--precision", "fake", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "p.png"
    assert main(["search", "--index-dir", idx, "--precision", "fake", "--text", "red", "-k", "4",
                 "--preview", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert len(stdout.splitlines()) == 4 and f"preview: {out}" in err
    assert Image.open(out).size == SheetLayout().size(4)
