"""The one caption reader (quant.core.captions): every format, strict vs lenient, file:line errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from clipfp8.quant.core.captions import captions_for_folder, find_captions_file, read_captions
from clipfp8.quant.core.errors import CalibrationDataError, CaptionsError, DatasetError

BOTH = pytest.mark.parametrize("strict", [True, False])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@BOTH
def test_json_lists_and_plain_strings(tmp_path: Path, strict: bool) -> None:
    f = _write(tmp_path / "c.json", json.dumps({"a.jpg": ["a red car", "  a car "], "b/c.jpg": "a dog on grass"}))
    # a plain string is one caption: never split into characters
    assert read_captions(f, strict=strict) == {"a.jpg": ["a red car", "a car"], "b/c.jpg": ["a dog on grass"]}


@BOTH
def test_csv_with_header_in_any_column_order(tmp_path: Path, strict: bool) -> None:
    f = _write(tmp_path / "c.csv", 'id,caption,image\n1,"a cat, asleep",x.png\n2,a second one,x.png\n3,dog,y.png\n')
    assert read_captions(f, strict=strict) == {"x.png": ["a cat, asleep", "a second one"], "y.png": ["dog"]}


def test_csv_with_a_bom_and_a_multiline_caption(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_bytes('\ufeffimage,caption\nx.png,"two\nlines"\ny.png,z\n'.encode("utf-8"))
    assert read_captions(f, strict=True) == {"x.png": ["two\nlines"], "y.png": ["z"]}


def test_headerless_csv_is_lenient_only(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.csv", "x.png,first\nx.png,second\n")
    assert read_captions(f, strict=False) == {"x.png": ["first", "second"]}
    with pytest.raises(CaptionsError, match=r"c\.csv:1: expected a header row with the columns 'image,caption'"):
        read_captions(f, strict=True)


def test_header_aliases_are_lenient_only(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.csv", "filename,text\nx.png,a cat\n")
    assert read_captions(f, strict=False) == {"x.png": ["a cat"]}
    with pytest.raises(CaptionsError, match=r"c\.csv:1:"):
        read_captions(f, strict=True)


def test_csv_bad_row_names_file_and_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = _write(tmp_path / "c.csv", "image,caption\nx.png,ok\n\ny.png,\nz.png,fine\n")
    with pytest.raises(CaptionsError, match=r"c\.csv:4: empty image or caption"):
        read_captions(f, strict=True)
    with caplog.at_level(logging.WARNING):
        assert read_captions(f, strict=False) == {"x.png": ["ok"], "z.png": ["fine"]}
    assert "skipped 1 entries" in caplog.text and "c.csv:4" in caplog.text


def test_json_bad_entry_names_file_line_and_key(tmp_path: Path) -> None:
    text = '{\n  "a.jpg": ["fine"],\n  "b.jpg": ["", "x"],\n  "c.jpg": 7,\n  "d.jpg": []\n}\n'
    f = _write(tmp_path / "c.json", text)
    with pytest.raises(CaptionsError, match=r"c\.json:3: entry 'b\.jpg'"):
        read_captions(f, strict=True)
    # lenient: the empty caption is dropped, entries without a usable caption are skipped
    assert read_captions(f, strict=False) == {"a.jpg": ["fine"], "b.jpg": ["x"]}
    _write(f, '{"a.jpg": "fine", "c.jpg": {"caption": "nested"}}')
    with pytest.raises(CaptionsError, match=r"c\.json:1: entry 'c\.jpg'"):
        read_captions(f, strict=True)


@BOTH
def test_unparsable_or_missing_files_fail_in_both_modes(tmp_path: Path, strict: bool) -> None:
    with pytest.raises(CaptionsError, match=r"captions file not found: .*nope\.json"):
        read_captions(tmp_path / "nope.json", strict=strict)
    bad = _write(tmp_path / "bad.json", '{\n  "a.jpg": ["x"],\n  "b.jpg": [\n}')
    with pytest.raises(CaptionsError, match=r"bad\.json:4: not valid JSON"):
        read_captions(bad, strict=strict)
    listed = _write(tmp_path / "list.json", '["a.jpg", "a cat"]')
    with pytest.raises(CaptionsError, match=r"list\.json:1: expected a JSON object"):
        read_captions(listed, strict=strict)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,caption\nx.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(CaptionsError, match=r"latin\.csv: not a UTF-8 text file"):
        read_captions(latin, strict=strict)


def test_empty_file_is_an_error_only_when_strict(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.json", "{}")
    assert read_captions(f, strict=False) == {}
    with pytest.raises(CaptionsError, match=r"c\.json: holds no captions"):
        read_captions(f, strict=True)


def test_captions_error_is_caught_as_dataset_and_calibration_error(tmp_path: Path) -> None:
    for kind in (DatasetError, CalibrationDataError):
        with pytest.raises(kind):
            read_captions(tmp_path / "missing.csv", strict=True)


def test_find_captions_file_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _write(flat / "captions.csv", "image,caption\na.png,x\n")
    assert find_captions_file(flat).path == flat / "captions.csv" and find_captions_file(flat).image_dir == flat
    _write(flat / "captions.json", '{"a.png": "x"}')  # json wins over csv
    assert find_captions_file(flat).path == flat / "captions.json"

    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    _write(ds / "captions.json", '{"a.png": ["x"]}')
    src = find_captions_file(ds)
    assert src.path == ds / "captions.json" and src.image_dir == ds / "images"
    # the images folder itself: its captions file sits beside it
    src = find_captions_file(ds / "images")
    assert src.path == ds / "captions.json" and src.image_dir == ds / "images"
    assert find_captions_file(tmp_path / "nothing") is None
    assert find_captions_file(tmp_path) is None


def test_captions_for_folder_keys_relative_to_the_folder(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    _write(ds / "captions.json", '{"a.png": ["x"], "b.png": "y"}')
    assert captions_for_folder(ds, strict=True) == {"images/a.png": ["x"], "images/b.png": ["y"]}
    assert captions_for_folder(ds / "images", strict=True) == {"a.png": ["x"], "b.png": ["y"]}
    assert captions_for_folder(tmp_path / "empty", strict=False) == {}
