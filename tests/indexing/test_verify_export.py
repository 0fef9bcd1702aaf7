"""verify (+repair) after damaging the FAISS file; Parquet export round trip."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfp8.indexing.consistency import verify
from clipfp8.indexing.errors import QueryError
from clipfp8.indexing.export import export_parquet
from clipfp8.indexing.pipeline import index_corpus
from clipfp8.indexing.store import open_index
from clipfp8.indexing.vectors import VectorIndex
from tests.fakes import FakeEncoder
from tests.indexing.conftest import encoders, index_state


def _damage(idx: Path, name: str, remove: list[int], add_orphan: int | None = None) -> None:
    """Rewrite the committed FAISS file of ``name`` behind the database's back."""
    with open_index(idx) as store:
        row = store.encoder_row(name)
        path = idx / "vectors" / f"{row['id']}.g{row['generation']}.faiss"
        vec = VectorIndex.from_bytes(path.read_bytes(), row["factory"], row["dim"])
    vec.remove(np.array(remove, np.int64))
    if add_orphan is not None:
        vec.add(np.array([add_orphan]), np.ones((1, vec.dim), np.float32) / np.sqrt(vec.dim))
    path.write_bytes(vec.to_bytes())


def test_verify_and_repair_after_deleting_vectors(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=1)
    before = index_state(idx)
    assert verify(idx).ok
    _damage(idx, "fake-fp16", remove=[2, 5], add_orphan=999)
    report = verify(idx)
    assert not report.ok
    assert report.encoders["fake-fp16"]["missing"] == [2, 5]
    assert report.encoders["fake-fp16"]["orphans"] == [999]
    assert not any(report.encoders["fake-fp8-fake"].values())
    encs = encoders()
    fixed = verify(idx, repair=True, encoders=encs)
    assert fixed.ok and fixed.reembedded == 2
    assert encs[0].calls["images"] == 2 and encs[1].calls["images"] == 0  # only what was missing
    assert index_state(idx) == before


def test_repair_without_encoders_drops_orphans_and_leaves_work_for_index(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=1)
    before = index_state(idx)
    _damage(idx, "fake-fp16", remove=[3])
    report = verify(idx, repair=True)
    assert report.encoders["fake-fp16"]["unembedded"] == [3] and not report.encoders["fake-fp16"]["missing"]
    s = index_corpus(corpus, idx, encoders(), workers=1)
    assert s.indexed == 1 and verify(idx).ok and index_state(idx) == before


def test_missing_faiss_file_is_rebuilt(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=1)
    before = index_state(idx)
    for p in (idx / "vectors").glob("1.g*.faiss"):
        p.unlink()
    report = verify(idx)
    assert report.file_missing == ["fake-fp16"] and not report.ok
    assert verify(idx, repair=True, encoders=encoders()).ok
    assert index_state(idx) == before


def test_parquet_round_trip(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    (corpus / "bad.png").write_bytes(b"nope")
    index_corpus(corpus, idx, encoders(), workers=1)
    out = tmp_path / "emb.parquet"
    with open_index(idx) as store:
        n = export_parquet(store, "fake-fp8-fake", out)
        vec = store.vectors("fake-fp8-fake")
        rows = {r["id"]: r for r in store.db.query("SELECT * FROM images")}
        with pytest.raises(QueryError, match="parquet"):
            export_parquet(store, "fake-fp16", tmp_path / "x.csv")
    table = pq.read_table(out)
    assert n == table.num_rows == 10  # the bad file has no embedding
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert table.schema.field("embedding").type.value_type == pa.float32()
    d = table.to_pydict()
    assert d["id"] == sorted(d["id"])
    emb = np.array(d["embedding"], np.float32)
    np.testing.assert_array_equal(emb, vec.reconstruct(np.array(d["id"])))
    for i, path, sha, w in zip(d["id"], d["image_path"], d["sha256"], d["width"], strict=False):
        assert (path, sha, w) == (rows[i]["path"], rows[i]["sha256"], rows[i]["width"])
    assert set(d["encoder"]) == {"fake-fp8-fake"}


def test_verify_on_missing_index(tmp_path: Path) -> None:
    from clipfp8.indexing.errors import IndexNotFoundError

    with pytest.raises(IndexNotFoundError):
        verify(tmp_path / "none", repair=True, encoders=[FakeEncoder()])
    assert not (tmp_path / "none").exists()


def test_verify_repairs_an_approximate_index_and_its_exact_copy(tmp_path: Path) -> None:
    from clipfp8.indexing.config import IndexConfig
    from tests.indexing.conftest import make_corpus

    corpus = tmp_path / "c"
    make_corpus(corpus, 12)
    idx = tmp_path / "idx"
    cfg = IndexConfig(workers=1, factory="HNSW8")
    index_corpus(corpus, idx, encoders(), config=cfg)
    before = index_state(idx)
    with open_index(idx) as store:
        row = store.encoder_row("fake-fp16")
        path = idx / "vectors" / f"{row['id']}.g{row['generation']}.faiss"
        vec = VectorIndex.from_bytes(path.read_bytes(), row["factory"], row["dim"])
    vec.raw.remove_ids(np.array([4], np.int64))  # the exact copy lost a vector
    path.write_bytes(vec.to_bytes())
    assert verify(idx).encoders["fake-fp16"]["copy_mismatch"] == [4]
    assert verify(idx, repair=True, encoders=encoders()).ok
    assert index_state(idx) == before
