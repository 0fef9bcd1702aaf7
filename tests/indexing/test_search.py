"""Search equals a numpy brute force over the same embeddings, for every index type."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.errors import QueryError
from clipfp8.indexing.pipeline import index_corpus
from clipfp8.indexing.query import search
from clipfp8.indexing.store import open_index
from tests.fakes import FakeEncoder
from tests.indexing.conftest import make_corpus


def _brute(store, enc, q: np.ndarray, k: int) -> list[tuple[str, float]]:  # type: ignore[no-untyped-def]
    rows = list(store.db.query("SELECT id, path FROM images WHERE status='ok' ORDER BY id"))
    files = [store.corpus_root / r["path"] for r in rows]
    emb = enc.encode_pil([Image.open(f) for f in files])  # embeddings recomputed from the files
    scores = emb @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [(rows[i]["path"], float(scores[i])) for i in order]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search") / "c"
    make_corpus(root, 60)
    for _i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (20, 20), colour).save(root / f"{colour}.png")
    return root


@pytest.mark.parametrize("factory,rerank", [("Flat", False), ("IVF4,Flat", False), ("IVF4,PQ4x4", True)])
def test_search_matches_brute_force(corpus: Path, tmp_path: Path, factory: str, rerank: bool) -> None:
    """Exact configurations: Flat, and IVF probing every list (nprobe 16 >= nlist 4); IVF-PQ's
    lossy codes probing every list with exact re-ranking of all candidates (k*10 >= N)."""
    enc = FakeEncoder()
    index_corpus(corpus, tmp_path / "idx", [enc], config=IndexConfig(workers=1, factory=factory, train_min=40))
    with open_index(tmp_path / "idx") as store:
        assert store.stats()["encoders"]["fake-fp16"]["index_type"] == ("flat" if factory == "Flat" else
                                                                          "other" if "HNSW" in factory else "ivf")
        for query in ["red", "a blue thing", Image.open(corpus / "d0" / "img004.png")]:
            q = enc.encode_texts([query])[0] if isinstance(query, str) else enc.encode_pil([query])[0]
            want = _brute(store, enc, q, 5)
            hits = search(store, enc, query, k=5, rerank=rerank)
            assert [h.path for h in hits] == [p for p, _ in want]
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], atol=1e-5)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF4,PQ4x4"])
def test_rerank_scores_exactly_for_approximate_indexes(corpus: Path, tmp_path: Path, factory: str) -> None:
    enc = FakeEncoder()
    index_corpus(corpus, tmp_path / "idx", [enc], config=IndexConfig(workers=1, factory=factory, train_min=40))
    with open_index(tmp_path / "idx") as store:
        q = enc.encode_texts(["green"])[0]
        exact = dict(_brute(store, enc, q, 1000))
        plain = search(store, enc, "green", k=5)
        hits = search(store, enc, "green", k=5, rerank=True)
        np.testing.assert_allclose([h.score for h in hits], [exact[h.path] for h in hits], atol=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].path == "green.png"
        if "PQ" in factory:  # lossy codes: plain scores are approximations, re-ranked ones are not
            assert any(abs(h.score - exact[h.path]) > 1e-4 for h in plain)


def test_threshold_k_and_image_query(corpus: Path, tmp_path: Path) -> None:
    enc = FakeEncoder()
    index_corpus(corpus, tmp_path / "idx", [enc], workers=1)
    with open_index(tmp_path / "idx") as store:
        all_hits = search(store, enc, "green", k=1000)
        assert len(all_hits) == 63 and all_hits[0].path == "green.png"
        assert [h.score for h in all_hits] == sorted((h.score for h in all_hits), reverse=True)
        cut = all_hits[10].score
        assert [h.path for h in search(store, enc, "green", k=100, threshold=cut)] == \
            [h.path for h in all_hits if h.score >= cut]
        assert search(store, enc, Image.open(corpus / "blue.png").convert("RGBA"), k=1)[0].path == "blue.png"
        assert search(store, enc, corpus / "red.png", k=1)[0].path == "red.png"  # a file path
        for bad in ("  ", 3):
            with pytest.raises(QueryError):
                search(store, enc, bad, k=3)  # type: ignore[arg-type]
        with pytest.raises(QueryError, match="k must be"):
            search(store, enc, "red", k=0)


def test_resolve_refuses_paths_outside_the_index(corpus: Path, tmp_path: Path) -> None:
    index_corpus(corpus, tmp_path / "idx", [FakeEncoder()], workers=1)
    with open_index(tmp_path / "idx") as store:
        assert store.resolve("red.png") == corpus.resolve() / "red.png"
        for bad in ("../etc/passwd", "/etc/passwd", "d0/../red.png", "not-there.png"):
            with pytest.raises(QueryError):
                store.resolve(bad)


def test_empty_index_returns_no_hits(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    index_corpus(tmp_path / "c", tmp_path / "idx", [FakeEncoder()])
    with open_index(tmp_path / "idx") as store:
        assert search(store, FakeEncoder(), "red") == []
