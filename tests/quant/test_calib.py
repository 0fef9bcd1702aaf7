"""Calibration data: folders, captions, prompts, deterministic sampling and clear errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from clipfp8.quant.calib import CalibConfig, CalibrationSet, default_sizes, find_images, prompt_for
from clipfp8.quant.core.captions import read_captions
from clipfp8.quant.core.errors import CalibrationDataError
from tests.quant.conftest import make_images
from tests.quant.eval.conftest import make_shard


def _pre(im) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.from_numpy(__import__("numpy").asarray(im.resize((8, 8)), dtype="float32")).permute(2, 0, 1)


class _Tok:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen += texts
        return torch.tensor([[len(t), hash(t) % 1000] for t in texts], dtype=torch.int64)


def test_batches_shapes_and_sizes(image_folder: Path) -> None:
    tok = _Tok()
    cs = CalibrationSet(CalibConfig(image_folder, num_samples=10, batch_size=4), _pre, tok)
    batches = list(cs)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2] and len(cs) == 3
    images, tokens = batches[0]
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 8, 8)
    assert tokens.dtype == torch.int64 and tokens.shape == (4, 2)


def test_default_sizes() -> None:
    assert default_sizes("cuda:0") == (8192, 512) and default_sizes("cpu") == (256, 32)


def test_sampling_is_deterministic(tmp_path: Path) -> None:
    make_images(tmp_path / "c", {"a": 10, "b": 10}, size=8)
    pick = lambda seed: [p.name for p, _ in CalibrationSet(  # noqa: E731
        CalibConfig(tmp_path / "c", num_samples=5, seed=seed), _pre, _Tok()).pairs]
    assert pick(0) == pick(0)
    assert pick(0) != pick(1)
    assert len(pick(2)) == 5


def test_prompts_from_folder_and_file_names(tmp_path: Path) -> None:
    root = tmp_path / "c"
    make_images(root, {"golden_retriever": 1, "": 1}, size=8)
    cs = CalibrationSet(CalibConfig(root), _pre, _Tok())
    caps = sorted(c for _, c in cs.pairs)
    assert caps == ["a photo of a golden retriever.", "a photo of a img."]
    assert prompt_for(root / "sea_view-12.jpg", root) == "a photo of a sea view."


def test_captions_json_and_csv(tmp_path: Path) -> None:
    root = tmp_path / "c"
    paths = make_images(root, {"x": 2}, size=8)
    js = tmp_path / "caps.json"
    js.write_text(json.dumps({"x/x_000.png": ["a black cat"], "x_001.png": "a dog"}))
    cs = CalibrationSet(CalibConfig(root, captions=js), _pre, _Tok())
    assert dict((p.name, c) for p, c in cs.pairs) == {"x_000.png": "a black cat", "x_001.png": "a dog"}
    csv_file = tmp_path / "caps.csv"
    csv_file.write_text("image,caption\nx/x_000.png,first\nx/x_000.png,second\n")
    assert read_captions(csv_file, strict=False) == {"x/x_000.png": ["first", "second"]}
    cs = CalibrationSet(CalibConfig(root, captions=csv_file), _pre, _Tok())
    assert dict((p.name, c) for p, c in cs.pairs)["x_001.png"] == "a photo of a x."
    assert len(paths) == 2


def test_bad_captions_files(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(CalibrationDataError, match="missing.json"):
        CalibrationSet(CalibConfig(image_folder, captions=tmp_path / "missing.json"), _pre, _Tok())
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(CalibrationDataError, match="bad.json"):
        read_captions(bad, strict=False)


def test_missing_empty_and_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="nope"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(CalibrationDataError, match="empty"):
        find_images(tmp_path / "empty")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(CalibrationDataError, match="not a folder"):
        find_images(tmp_path / "file.png")


def test_undecodable_files_skipped_and_zero_decodable_raises(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "c"
    make_images(root, {"ok": 3}, size=8)
    (root / "ok" / "broken.jpg").write_bytes(b"not an image")
    cs = CalibrationSet(CalibConfig(root, batch_size=8), _pre, _Tok())
    with caplog.at_level(logging.WARNING, logger="clipfp8.quant.calib"):
        batches = list(cs)
    assert sum(b[0].shape[0] for b in batches) == 3
    assert [p.name for p in cs.skipped] == ["broken.jpg"] and "broken.jpg" in caplog.text

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(CalibrationDataError, match=r"bad: none of 2"):
        list(CalibrationSet(CalibConfig(bad), _pre, _Tok()))


def test_config_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        CalibConfig(tmp_path, num_samples=0)


def _jpeg(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_shard(path, [{"__key__": key, **parts} for key, parts in samples.items()])


@pytest.fixture
def shard_root(tmp_path: Path) -> Path:
    """Webdataset shards in nested folders, in the layouts of ../shared/data/train."""
    root = tmp_path / "train"
    _write_shard(root / "photos" / "p-0000.tar.gz", {
        "f8k_1": {"jpg": _jpeg(1), "txt": b"first caption", "json": json.dumps(
            {"captions": ["a dog runs on the beach", "a brown dog in the sand"]}).encode()},
        "web_2": {"jpg": _jpeg(2), "txt": b"ignored", "json": json.dumps({"caption": "a red car"}).encode()},
    })
    _write_shard(root / "classes" / "c-0000.tar", {
        "cifar_3": {"jpg": _jpeg(3), "txt": b"cat", "json": json.dumps({"label": "cat"}).encode()},
        "bare_4": {"png": _jpeg(4), "txt": b"just a line"},  # extension is not content: Pillow sniffs
        "noimage_5": {"txt": b"text only", "json": b"{}"},
    })
    return root


def test_calibration_from_webdataset_shards(shard_root: Path) -> None:
    tok = _Tok()
    cs = CalibrationSet(CalibConfig(shard_root, num_samples=100, batch_size=3), _pre, tok)
    caps = {name.split(":", 1)[1]: cap for name, cap in cs.pairs}
    assert sorted(caps) == ["bare_4", "cifar_3", "f8k_1", "web_2"]  # every sample with an image
    assert caps["f8k_1"] in ("a dog runs on the beach", "a brown dog in the sand")  # json captions
    assert caps["web_2"] == "a red car"  # json caption beats txt
    assert caps["cifar_3"] == "a photo of a cat."  # a labelled sample's txt is a class name
    assert caps["bare_4"] == "just a line"
    batches = list(cs)
    assert [b[0].shape for b in batches] == [(3, 3, 8, 8), (1, 3, 8, 8)] and not cs.skipped
    assert sorted(tok.seen) == sorted(caps.values())


def test_shard_sampling_is_seeded_and_reads_only_what_it_needs(shard_root: Path) -> None:
    pick = lambda seed: [n for n, _ in CalibrationSet(  # noqa: E731
        CalibConfig(shard_root, num_samples=2, seed=seed), _pre, _Tok()).pairs]
    assert pick(0) == pick(0) and len(pick(0)) == 2
    assert {tuple(pick(s)) for s in range(6)} != {tuple(pick(0))}  # the seed chooses the subset
    one = CalibrationSet(CalibConfig(shard_root / "classes" / "c-0000.tar"), _pre, _Tok())  # a shard file
    assert sorted(n for n, _ in one.pairs) == ["c-0000.tar:bare_4", "c-0000.tar:cifar_3"]


def test_shard_errors_name_the_problem(shard_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="--captions applies to a folder of images"):
        CalibrationSet(CalibConfig(shard_root, captions=tmp_path / "c.json"), _pre, _Tok())
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("hi")
    with pytest.raises(CalibrationDataError, match="no image files and no webdataset shards"):
        CalibrationSet(CalibConfig(tmp_path / "nothing"), _pre, _Tok())
    bad = tmp_path / "bad" / "x-0000.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a tar at all")
    with pytest.raises(CalibrationDataError, match="x-0000.tar.gz"):
        CalibrationSet(CalibConfig(bad.parent), _pre, _Tok())
    _write_shard(tmp_path / "noimg" / "t.tar", {"a": {"txt": b"no picture"}})
    with pytest.raises(CalibrationDataError, match="no sample holds an image"):
        CalibrationSet(CalibConfig(tmp_path / "noimg"), _pre, _Tok())
