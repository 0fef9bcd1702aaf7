"""VectorIndex layouts (flat, ivf, other), their ids and exact copies, and FAISS files that do not
have the layout the index expects."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from clipfp8.indexing.errors import IndexCorruptError
from clipfp8.indexing.vectors import VectorIndex

DIM = 8


def _unit(n: int, seed: int = 0) -> np.ndarray:
    """float32 (n, DIM) unit rows."""
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _filled(factory: str, n: int) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    vec = VectorIndex.new(DIM, factory)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    vectors = _unit(n)
    vec.add(ids, vectors)
    return vec, ids, vectors


@pytest.mark.parametrize("factory,kind,has_copy", [("Flat", "flat", False), ("HNSW8", "other", True)])
def test_ids_and_exact_copy_survive_a_round_trip(factory: str, kind: str, has_copy: bool) -> None:
    vec, ids, vectors = _filled(factory, 30)
    back = VectorIndex.from_bytes(vec.to_bytes(), factory, DIM)
    assert back.kind == kind
    np.testing.assert_array_equal(np.sort(back.ids()), ids)
    copy_ids = back.copy_ids()
    assert (copy_ids is not None) == has_copy
    if copy_ids is not None:
        np.testing.assert_array_equal(np.sort(copy_ids), ids)
    np.testing.assert_allclose(back.reconstruct(ids[:5]), vectors[:5])


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF2,Flat"])
def test_saved_file_is_to_bytes_whether_streamed_or_not(factory: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``save`` streams the layouts without a length field through ``faiss.write_index`` (Flat;
    an exact copy on disk) and writes the others from ``to_bytes``: the same file either way."""
    vec, ids, _ = _filled(factory, 40)
    vec.maybe_train(train_min=20)
    written = vec.save(tmp_path / "v.faiss")
    assert (tmp_path / "v.faiss") in written
    assert (tmp_path / "v.faiss").read_bytes() == vec.to_bytes()
    back = VectorIndex.load(tmp_path / "v.faiss", factory, DIM)
    np.testing.assert_array_equal(np.sort(back.ids()), ids)


def test_ivf_trains_once_enough_vectors_exist_and_keeps_every_id() -> None:
    vec, ids, vectors = _filled("IVF2,Flat", 2 * 39)
    assert vec.kind == "flat" and vec.copy_ids() is None
    assert vec.maybe_train()
    assert vec.kind == "ivf"
    np.testing.assert_array_equal(np.sort(vec.ids()), ids)
    np.testing.assert_array_equal(np.sort(vec.copy_ids()), ids)
    assert vec.remove(ids[:3]) == 3
    np.testing.assert_array_equal(np.sort(vec.ids()), ids[3:])
    np.testing.assert_array_equal(np.sort(vec.copy_ids()), ids[3:])


def test_hnsw_removal_rebuilds_from_the_exact_copy() -> None:
    vec, ids, vectors = _filled("HNSW8", 20)
    assert vec.remove(ids[::2]) == 10
    np.testing.assert_array_equal(np.sort(vec.ids()), ids[1::2])
    np.testing.assert_array_equal(np.sort(vec.copy_ids()), ids[1::2])
    _, found = vec.search(vectors[1:2], 1)
    assert found[0, 0] == ids[1]


def test_hnsw_without_its_exact_copy_cannot_remove() -> None:
    vec, ids, _ = _filled("HNSW8", 10)
    bare = VectorIndex.from_bytes(faiss.serialize_index(vec.index).tobytes(), "HNSW8", DIM)
    assert bare.raw is None and bare.kind == "other"
    with pytest.raises(IndexCorruptError, match="no exact copy"):
        bare.remove(ids[:1])
    assert bare.ntotal == 10  # nothing removed


def test_index_without_id_map_is_reported_corrupt() -> None:
    plain = faiss.IndexFlatIP(DIM)
    plain.add(_unit(4))
    vec = VectorIndex.from_bytes(faiss.serialize_index(plain).tobytes(), "Flat", DIM)
    with pytest.raises(IndexCorruptError, match="IndexFlatIP.*IndexIDMap2"):
        vec.ids()
    with pytest.raises(IndexCorruptError, match="IndexIDMap2"):
        _ = vec.kind
