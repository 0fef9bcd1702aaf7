"""``--factory auto``: the plan by size and budget, IVF-PQ with exact re-ranking from the on-disk
float16 copy, its bytes per vector, the store's files, and bad budgets."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from clipfp8.indexing import faiss_factory as ff
from clipfp8.indexing.errors import IndexConfigError, IndexCorruptError
from clipfp8.indexing.exact_store import ExactVectors, paths
from clipfp8.indexing.query import RERANK_FACTOR
from clipfp8.indexing.vectors import VectorIndex

K = 10


def _clustered(n: int, dim: int, seed: int, centres: int = 64) -> np.ndarray:
    """float32 (n, dim) unit rows: a mixture of Gaussians around random centres, normalised."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(1234).standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K].tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


# ----- the plan ----------------------------------------------------------------------------------
def test_flat_below_threshold_ivf_above_and_nlist_follows_sqrt_n() -> None:
    assert ff.plan_index(50_000, 768).factory == "Flat"
    assert ff.plan_index(99_999, 768, ff.IndexBudget(bytes_per_vector=20)).kind == "flat"  # budget: only above
    for n in (1_000_000, 10_000_000, 100_000_000):
        plan = ff.plan_index(n, 768)
        assert plan.kind == "ivf" and plan.factory.startswith(f"IVF{plan.nlist}_HNSW32,PQ")
        assert 4 * math.sqrt(n) <= plan.nlist <= 16 * math.sqrt(n)
        assert plan.bytes_per_vector <= ff.DEFAULT_BYTES_PER_VECTOR
        assert plan.nprobe <= plan.ef_search and plan.nlist <= plan.train_size <= n
    assert ff.plan_index(10_000_000, 768).factory == "IVF16384_HNSW32,PQ128x4fs"
    assert ff.plan_index(10_000_000, 768).rerank_factor == ff.FASTSCAN_RERANK_FACTOR
    assert ff.plan_index(200_000, 768).factory.startswith("IVF") and "HNSW" not in ff.plan_index(200_000, 768).factory


@pytest.mark.parametrize("budget,codes", [("100", "PQ128x4fs"), ("50", "PQ64x4fs"), ("1000", "SQ8"), ("2000", "SQfp16"),
                                          ("100M", "PQ128x4fs"), ("1G", "SQ8"), ("100000000B", "PQ128x4fs")])
def test_codes_fill_the_budget(budget: str, codes: str) -> None:
    b = ff.parse_budget(budget)
    plan = ff.plan_index(1_000_000, 768, b)
    assert plan.codes == codes
    assert plan.bytes_per_vector <= b.per_vector(1_000_000)


def test_total_budget_is_divided_by_the_count() -> None:
    total = ff.parse_budget("8G")
    assert total.total_bytes == 8 << 30
    assert ff.plan_index(10_000_000, 768, total).codes == "SQ8"     # 859 B/vector
    assert ff.plan_index(100_000_000, 768, total).codes.startswith("PQ")  # 86 B/vector


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "12x", "1e9", "nan"])
def test_bad_budget_text_names_the_flag(text: str) -> None:
    with pytest.raises(IndexConfigError, match="--index-budget"):
        ff.parse_budget(text)


def test_budget_too_small_for_ids_and_codes_names_the_flag() -> None:
    with pytest.raises(IndexConfigError, match="--index-budget"):
        ff.plan_index(1_000_000, 768, ff.IndexBudget(bytes_per_vector=10))
    with pytest.raises(IndexConfigError, match="--index-budget"):
        VectorIndex.new(64, "auto:abc")


def test_factory_strings_round_trip_the_budget() -> None:
    assert ff.auto_factory() == "auto" and ff.budget_of("auto") == ff.IndexBudget()
    for text in ("100", "8G", "512M", "1000B"):
        b = ff.parse_budget(text)
        assert ff.budget_of(ff.auto_factory(b)) == b
    assert ff.is_auto("auto:8G") and not ff.is_auto("IVF1024,Flat")


def test_cli_folds_the_budget_into_the_factory() -> None:
    from clipfp8.indexing.cli import index_factory
    from clipfp8.quant.cli import CLIUsageError

    assert index_factory("auto", None) == "auto" and index_factory("auto", "8G") == "auto:8G"
    assert index_factory("IVF64,Flat", None) == "IVF64,Flat"
    with pytest.raises(CLIUsageError, match="--index-budget"):
        index_factory("Flat", "100")
    with pytest.raises(IndexConfigError, match="--index-budget"):
        index_factory("auto", "lots")


# ----- IVF-PQ with exact re-ranking ---------------------------------------------------------------
@pytest.fixture(scope="module")
def ivfpq() -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    """20k clustered 64-d vectors in an ``auto:32`` index switched to IVF at 10k vectors (PQ32x4fs: 16 bytes)."""
    x = _clustered(20_000, 64, seed=0)
    vec = VectorIndex.new(64, "auto:32")
    vec.add(np.arange(1, 20_001), x)
    assert vec.kind == "flat"                # below FLAT_MAX_VECTORS: exact
    assert vec.maybe_train(train_min=10_000)
    return vec, x, _clustered(100, 64, seed=1)


def test_ivfpq_rerank_reaches_recall_plain_codes_do_not(ivfpq: tuple[VectorIndex, np.ndarray, np.ndarray]) -> None:
    vec, x, q = ivfpq
    assert vec.kind == "ivf" and vec.exact_copy is not None and vec.raw is None
    assert ff.plan_index(20_000, 64, ff.parse_budget("32"), flat_max=10_000).codes == "PQ32x4fs"
    assert vec.rerank_factor == ff.FASTSCAN_RERANK_FACTOR > RERANK_FACTOR
    truth = np.argsort(-(q @ x.T), axis=1)[:, :K] + 1
    _, plain = vec.search(q, K)
    _, cand = vec.search(q, K * vec.rerank_factor)
    reranked = np.stack([c[np.argsort(-(vec.reconstruct(c) @ qq), kind="stable")] for c, qq in zip(cand, q, strict=True)])
    assert _recall(reranked, truth) >= 0.95
    assert _recall(plain, truth) < _recall(reranked, truth) - 0.1


def test_saved_auto_ivf_file_is_to_bytes_streamed(ivfpq: tuple[VectorIndex, np.ndarray, np.ndarray],
                                                 tmp_path: Path) -> None:
    """An ``auto`` IVF's FAISS file (magic + index, its exact copy in files beside it) is streamed
    by ``save`` through ``faiss.write_index``: byte for byte ``to_bytes()``, and it loads back."""
    vec, x, _ = ivfpq
    written = vec.save(tmp_path / "v.faiss")
    assert (tmp_path / "v.faiss").read_bytes() == vec.to_bytes() and len(written) > 1
    back = VectorIndex.load(tmp_path / "v.faiss", vec.factory, 64)
    assert back.kind == "ivf" and back.exact_copy is not None and back.ntotal == len(x)


def test_exact_copy_is_float16_of_the_vectors_and_bytes_per_vector_fit(ivfpq: tuple[VectorIndex, np.ndarray, np.ndarray]) -> None:
    vec, x, _ = ivfpq
    ids = np.array([1, 777, 20_000])
    np.testing.assert_allclose(vec.reconstruct(ids), x[ids - 1], atol=1e-3)
    assert vec.reconstruct(ids).dtype == np.float32
    plan = ff.plan_index(20_000, 64, ff.parse_budget("32"), flat_max=10_000)
    assert vec.index.code_size == plan.code_bytes == 16  # bytes stored per vector in the lists, + an 8-byte id
    per_vector = ff.index_bytes(vec.index) / vec.ntotal
    assert per_vector <= 32 and abs(per_vector - plan.bytes_per_vector) < 3
    assert not ff.replan_due(vec.index, ff.plan_index(20_000, 64, ff.parse_budget("32")))
    assert ff.replan_due(vec.index, ff.plan_index(20_000 * 50, 64, ff.parse_budget("32")))


def test_store_files_round_trip_and_removal(tmp_path: Path, ivfpq: tuple[VectorIndex, np.ndarray, np.ndarray]) -> None:
    vec, x, q = ivfpq
    written = vec.save(tmp_path / "1.g1.faiss")
    assert sorted(p.name for p in written) == ["1.g1.f16.npy", "1.g1.faiss", "1.g1.ids.npy"]
    back = VectorIndex.load(tmp_path / "1.g1.faiss", "auto:32", 64)
    assert back.kind == "ivf" and back._ivf.nprobe == vec._ivf.nprobe  # the planned nprobe is kept
    np.testing.assert_array_equal(back.search(q, K)[1], vec.search(q, K)[1])
    assert back.remove(np.array([5, 6, 7, 99_999])) == 3
    back.add(np.array([7]), x[:1])                                     # id 7 gets another vector
    back.save(tmp_path / "1.g2.faiss")
    again = VectorIndex.load(tmp_path / "1.g2.faiss", "auto:32", 64)
    assert again.ntotal == 19_998 and 5 not in set(again.copy_ids().tolist())
    np.testing.assert_array_equal(np.sort(again.ids()), again.copy_ids())  # the index's ids = the copy's
    np.testing.assert_allclose(again.reconstruct(np.array([7])), x[:1], atol=1e-3)
    with pytest.raises(IndexCorruptError, match="verify --repair"):
        again.reconstruct(np.array([5]))


# ----- the on-disk exact copy ---------------------------------------------------------------------
def test_exact_vectors_merge_replace_remove_and_link_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6, 8)).astype(np.float32)
    ev = ExactVectors(8)
    ev.add(np.array([50, 10, 30]), v[:3])
    ev.write(tmp_path / "e.g1")
    ev.add(np.array([20, 30, 60]), v[3:])      # 30 replaced, 20 and 60 new
    assert ev.remove(np.array([10, 11])) == 1
    assert ev.ids().tolist() == [20, 30, 50, 60] and ev.ntotal == 4
    np.testing.assert_allclose(ev.lookup(np.array([30, 50, 20])), v[[4, 0, 3]], atol=1e-2)
    ev.write(tmp_path / "e.g2")
    reopened = ExactVectors.open(tmp_path / "e.g2", 8)
    assert reopened.ids().tolist() == [20, 30, 50, 60] and not reopened.dirty
    assert [len(i) for i, _ in reopened.batches(3)] == [3, 1]
    reopened.write(tmp_path / "e.g3")            # unchanged: a second name for the same data
    assert paths(tmp_path / "e.g3")[1].stat().st_ino == paths(tmp_path / "e.g2")[1].stat().st_ino
    with pytest.raises(IndexCorruptError):
        ExactVectors.open(tmp_path / "e.g3", 16)


# ----- through the pipeline and the store ----------------------------------------------------------
def test_auto_index_upgrades_in_the_pipeline_and_search_reranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipfp8.indexing.config import IndexConfig
    from clipfp8.indexing.consistency import verify
    from clipfp8.indexing.pipeline import index_corpus
    from clipfp8.indexing.query import search
    from clipfp8.indexing.store import open_index
    from tests.fakes import FakeEncoder
    from tests.indexing.conftest import make_corpus

    monkeypatch.setattr(ff, "FLAT_MAX_VECTORS", 30)  # tiny thresholds: a 40-image corpus becomes an IVF
    monkeypatch.setattr(ff, "MIN_IVF_VECTORS", 30)
    monkeypatch.setattr(ff, "MIN_CENTROID_POINTS", 10)
    corpus = tmp_path / "c"
    make_corpus(corpus, 40)
    enc = FakeEncoder()
    cfg = IndexConfig(workers=1, factory="auto:1000", commit_every=16)
    index_corpus(corpus, tmp_path / "idx", [enc], config=cfg)
    with open_index(tmp_path / "idx") as store:
        row = store.encoder_row(enc.name)
        assert row["index_type"] == "ivf" and row["factory"] == "auto:1000"
        files = sorted(p.name.split(".", 2)[2] for p in (tmp_path / "idx" / "vectors").iterdir())
        assert files == ["f16.npy", "faiss", "ids.npy"]  # one generation, old ones deleted
        q = enc.encode_texts(["red"])[0]
        ids = np.array(sorted(store.vectors(enc.name).copy_ids()))
        exact = store.vectors(enc.name).reconstruct(ids) @ q
        hits = search(store, enc, "red", k=5)      # default: re-ranked from the exact copy
        want = ids[np.argsort(-exact, kind="stable")[:5]]
        assert [h.id for h in hits] == want.tolist()
    (corpus / "d0" / "img000.png").unlink()
    index_corpus(corpus, tmp_path / "idx", [enc], config=cfg)
    assert verify(tmp_path / "idx").ok
    with open_index(tmp_path / "idx") as store:
        assert store.vectors(enc.name).ntotal == 39 == len(store.vectors(enc.name).copy_ids())


def test_flat_index_switches_to_auto_while_exact_and_warns_when_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from clipfp8.indexing.config import IndexConfig
    from clipfp8.indexing.pipeline import index_corpus
    from clipfp8.indexing.store import open_index
    from tests.fakes import FakeEncoder
    from tests.indexing.conftest import make_corpus

    corpus = tmp_path / "c"
    make_corpus(corpus, 12)
    monkeypatch.setattr(ff, "FLAT_MAX_VECTORS", 10)
    with caplog.at_level(logging.WARNING, logger="clipfp8.indexing.vectors"):
        index_corpus(corpus, tmp_path / "idx", [FakeEncoder()], config=IndexConfig(workers=1, factory="Flat"))
    assert "--factory auto" in caplog.text                                 # the hint past the threshold
    index_corpus(corpus, tmp_path / "idx", [FakeEncoder()], config=IndexConfig(workers=1, factory="auto:8G"))
    with open_index(tmp_path / "idx") as store:
        assert store.encoder_row("fake-fp16")["factory"] == "auto:8G"   # still flat: switched, nothing rebuilt
        assert store.encoder_row("fake-fp16")["index_type"] == "flat"
