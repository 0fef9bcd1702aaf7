"""One reading of a webdataset sample's captions for evaluation (strict) and calibration
(lenient): the same captions where the sample is sound, an error or nothing where it is not."""
from __future__ import annotations

import json

import pytest

from clipfp8.quant.calib import _shard_caption
from clipfp8.quant.core.errors import DatasetError
from clipfp8.quant.core.shards import sample_captions, sample_meta


def j(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(("parts", "expected"), [
    ({"json": j({"captions": [" a dog ", "", "a brown dog"]})}, ["a dog", "a brown dog"]),
    ({"json": j({"caption": "a cat"})}, ["a cat"]),
    ({"txt": b"first line\n\n second line \n"}, ["first line", "second line"]),
    ({"json": j({"id": 3}), "txt": b"from txt"}, ["from txt"]),
])
def test_sound_samples_read_the_same_both_ways(parts: dict[str, bytes], expected: list[str]) -> None:
    assert sample_captions(parts, "s") == expected
    assert sample_captions(parts, "s", strict=False) == expected
    assert _shard_caption(parts) == expected


@pytest.mark.parametrize(("parts", "message"), [
    ({"json": b"{broken", "txt": b"x"}, "invalid .json"),
    ({"json": j(["a list"])}, "must be an object"),
    ({"json": j({"captions": [1, 2]})}, "string or a list of strings"),
    ({"json": j({"captions": ["  "]})}, "no caption"),
    ({}, "no caption"),
])
def test_broken_samples_fail_evaluation_and_are_skipped_by_calibration(parts: dict[str, bytes], message: str) -> None:
    with pytest.raises(DatasetError, match=message) as err:
        sample_captions(parts, "shard.tar: sample 'k'")
    assert "shard.tar: sample 'k'" in str(err.value)
    lenient = sample_captions(parts, strict=False)
    assert lenient == (["x"] if parts.get("txt") else [])  # a broken .json counts as absent


def test_a_class_name_becomes_a_prompt_for_calibration_only() -> None:
    parts = {"json": j({"label": 3}), "txt": b"golden retriever"}
    assert _shard_caption(parts) == ["a photo of a golden retriever."]
    assert sample_meta(parts) == {"label": 3}


@pytest.mark.parametrize(("parts", "expected"), [
    ({"json": j({"captions": [], "caption": "a dog"})}, ["a dog"]),  # an empty list falls back
    ({"json": j({"caption": "", "label": 3}), "txt": b"cat"}, ["a photo of a cat."]),
    ({"json": j({"captions": [1], "caption": " a cat "})}, ["a cat"]),
    ({"json": j({"captions": None}), "txt": b"from txt"}, ["from txt"]),
    ({"json": b"{broken", "txt": b"line"}, ["line"]),
])
def test_calibration_tries_every_usable_text(parts: dict[str, bytes], expected: list[str]) -> None:
    assert _shard_caption(parts) == expected
