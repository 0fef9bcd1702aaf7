"""Dataset loaders: folders, captions JSON/CSV, webdataset shards, subsets, templates, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipfp8.quant.core.errors import DatasetError
from clipfp8.quant.eval.datasets import (
    ClassificationData,
    DatasetSpec,
    RetrievalData,
    detect_kind,
    load_dataset,
    open_image,
)
from clipfp8.quant.eval.templates import CIFAR10_TEMPLATES, fill, load_templates
from tests.quant.eval.conftest import make_class_folder, make_retrieval_folder, make_shard, png_bytes


def test_class_folder_sorted_with_folder_names(colour_classes):
    data = load_dataset(DatasetSpec(colour_classes))
    assert isinstance(data, ClassificationData) and data.name == "colours"
    assert data.classnames == ["blue", "green", "red", "yellow"]
    assert data.labels.tolist() == [0] * 4 + [1] * 2 + [2] * 3 + [3]
    assert data.ids[0] == "blue/000.png" and all(isinstance(p, Path) for p in data.images)


def test_class_folder_uses_classes_json(tmp_path):
    root = make_class_folder(tmp_path / "wn", {"n001": 2, "n002": 1}, {"n001": "red", "n002": "tench"})
    data = load_dataset(DatasetSpec(root))
    assert data.classnames == ["red", "tench"]
    (root / "classes.json").write_text(json.dumps({"n001": "red"}))
    with pytest.raises(DatasetError, match=r"classes\.json.*n002"):
        load_dataset(DatasetSpec(root))
    (root / "classes.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"classes\.json"):
        load_dataset(DatasetSpec(root))


def test_retrieval_folder_json_and_csv_agree(tmp_path, colour_captions):
    data = load_dataset(DatasetSpec(colour_captions))
    assert isinstance(data, RetrievalData)
    assert data.ids == sorted(data.ids) and len(data.images) == 5
    assert data.captions[data.ids.index("blue_0.png")] == ["blue", "a blue thing", "the colour blue"]
    texts, owner = data.flat_captions()
    assert len(texts) == 9 and owner.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 4]
    assert [data.ids[o] for o in owner] == [i for i, c in zip(data.ids, data.captions, strict=False) for _ in c]
    caps = dict(zip(data.ids, data.captions, strict=False))
    csv_root = make_retrieval_folder(tmp_path / "csv", caps, fmt="csv", images_subdir=False)
    from_csv = load_dataset(DatasetSpec(csv_root, kind="retrieval"))
    assert from_csv.ids == data.ids and from_csv.captions == data.captions


def test_retrieval_errors_name_the_file(tmp_path, colour_captions):
    (colour_captions / "images" / "blue_0.png").unlink()
    with pytest.raises(DatasetError, match=r"captions\.json.*missing.*blue_0\.png"):
        load_dataset(DatasetSpec(colour_captions))
    bad = make_retrieval_folder(tmp_path / "bad", {"red_0.png": ["x"]}, fmt="csv")
    (bad / "captions.csv").write_text("file,text\nred_0.png,x\n")
    with pytest.raises(DatasetError, match=r"captions\.csv.*image,caption"):
        load_dataset(DatasetSpec(bad))
    (bad / "captions.csv").unlink()
    (bad / "captions.json").write_text(json.dumps({"red_0.png": []}))
    with pytest.raises(DatasetError, match=r"captions\.json.*red_0\.png"):
        load_dataset(DatasetSpec(bad))


def test_detect_kind_and_bad_paths(tmp_path, colour_classes, colour_captions):
    assert detect_kind(colour_classes) == "classification"
    assert detect_kind(colour_captions) == "retrieval"
    with pytest.raises(DatasetError, match="does not exist.*nowhere"):
        load_dataset(DatasetSpec(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(DatasetSpec(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="no class subfolder"):
        load_dataset(DatasetSpec(tmp_path / "empty", kind="classification"))
    (tmp_path / "note.txt").write_text("hi")
    with pytest.raises(DatasetError, match="note.txt"):
        load_dataset(DatasetSpec(tmp_path / "note.txt"))


def test_spec_parse_kind_suffix():
    assert DatasetSpec.parse("/a/b:retrieval").kind == "retrieval"
    assert DatasetSpec.parse("/a/b:retrieval").path == Path("/a/b")
    spec = DatasetSpec.parse("/a/c:d", limit=5, seed=3)
    assert spec.path == Path("/a/c:d") and spec.kind == "auto" and spec.limit == 5 and spec.seed == 3
    assert DatasetSpec.parse("x/s.tar.gz").name == "s"
    with pytest.raises(ValueError, match="limit"):
        DatasetSpec(Path("x"), limit=0)


def test_limit_is_seeded_subset_in_order(tmp_path):
    root = make_class_folder(tmp_path / "many", {"red": 30, "blue": 30})
    full = load_dataset(DatasetSpec(root))
    a = load_dataset(DatasetSpec(root, limit=10, seed=1))
    b = load_dataset(DatasetSpec(root, limit=10, seed=1))
    c = load_dataset(DatasetSpec(root, limit=10, seed=2))
    assert a.ids == b.ids and a.ids != c.ids and len(a.ids) == 10
    idx = [full.ids.index(i) for i in a.ids]
    assert idx == sorted(idx) and a.labels.tolist() == full.labels[idx].tolist()
    assert load_dataset(DatasetSpec(root, limit=1000)).ids == full.ids


def test_shard_classification_string_and_int_labels(tmp_path):
    samples = [{"__key__": f"s{i}", "jpg": png_bytes(c), "json": {"label": c}}
               for i, c in enumerate(["red", "blue", "red", "green"])]
    data = load_dataset(DatasetSpec(make_shard(tmp_path / "a.tar.gz", samples)))
    assert isinstance(data, ClassificationData) and data.name == "a"
    assert data.classnames == ["blue", "green", "red"] and data.labels.tolist() == [2, 0, 2, 1]
    assert isinstance(data.images[0], bytes) and data.ids[0] == "a.tar.gz:s0"
    folder = tmp_path / "ints"
    folder.mkdir()
    make_shard(folder / "0.tar", [{"__key__": "x/a", "png": png_bytes("red"), "cls": "1"}])
    make_shard(folder / "1.tar", [{"__key__": "x/b", "png": png_bytes("blue"), "json": {"class": 0}}])
    (folder / "classes.json").write_text(json.dumps(["blue", "red"]))
    data = load_dataset(DatasetSpec(folder))
    assert data.labels.tolist() == [1, 0] and data.classnames == ["blue", "red"]
    assert open_image(data.images[0], data.ids[0]).getpixel((0, 0)) == (255, 0, 0)


def test_shard_txt_is_caption_by_default_and_label_when_asked(tmp_path):
    shard = make_shard(tmp_path / "t.tar", [
        {"__key__": "k0", "jpg": png_bytes("red"), "txt": "a red square\nsomething red\n"},
        {"__key__": "k1", "jpg": png_bytes("blue"), "json": {"captions": ["blue", "azure"]}},
        {"__key__": "k2", "jpg": png_bytes("green"), "json": {"caption": "green"}},
    ])
    data = load_dataset(DatasetSpec(shard))
    assert isinstance(data, RetrievalData)
    assert data.captions == [["a red square", "something red"], ["blue", "azure"], ["green"]]
    labelled = make_shard(tmp_path / "l.tar", [{"__key__": "k0", "jpg": png_bytes("red"), "txt": "red"},
                                               {"__key__": "k1", "jpg": png_bytes("blue"), "txt": "blue"}])
    data = load_dataset(DatasetSpec.parse(f"{labelled}:classification"))
    assert data.classnames == ["blue", "red"] and data.labels.tolist() == [1, 0]


def test_shard_errors_name_the_shard(tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match="broken.tar.gz"):
        load_dataset(DatasetSpec(broken, kind="classification"))
    nolabel = make_shard(tmp_path / "n.tar", [{"__key__": "k0", "jpg": png_bytes("red"), "json": {"x": 1}}])
    with pytest.raises(DatasetError, match=r"n\.tar.*cannot tell"):
        load_dataset(DatasetSpec(nolabel))
    with pytest.raises(DatasetError, match=r"n\.tar.*k0.*no class label"):
        load_dataset(DatasetSpec(nolabel, kind="classification"))
    noimg = make_shard(tmp_path / "e.tar", [{"__key__": "k0", "json": {"label": "red"}}])
    with pytest.raises(DatasetError, match=r"e\.tar.*no image"):
        load_dataset(DatasetSpec(noimg))


def test_undecodable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="bad.jpg"):
        open_image(bad, str(bad))


def test_templates_default_file_and_errors(tmp_path):
    assert len(CIFAR10_TEMPLATES) == 18 and CIFAR10_TEMPLATES[0] == "a photo of a {}."
    assert fill("a {c} here", "cat") == "a cat here" and fill("a photo of a {}.", "dog") == "a photo of a dog."
    txt = tmp_path / "t.txt"
    txt.write_text("a {} photo\n\nart of {c}\n")
    assert load_templates(txt) == ("a {} photo", "art of {c}")
    js = tmp_path / "t.json"
    js.write_text(json.dumps(["x {}"]))
    assert load_templates(js) == ("x {}",)
    js.write_text(json.dumps(["no placeholder"]))
    with pytest.raises(DatasetError, match="t.json.*placeholder"):
        load_templates(js)
    with pytest.raises(DatasetError, match="missing.txt"):
        load_templates(tmp_path / "missing.txt")
