"""Indexing configuration as a self-validating dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif",
)
#: Limits on one file's working memory (``--max-pixels``, ``--max-file-bytes``, ``--max-aspect``).
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_FILE_BYTES = 256 << 20
DEFAULT_MAX_ASPECT = 20.0
DECODE_MODES: tuple[str, ...] = ("auto", "cpu", "gpu")
#: Where decode + embed run (``--engine``): this process, or a Ray actor pool (``indexing.ray_engine``).
ENGINES: tuple[str, ...] = ("local", "ray")


@dataclass(frozen=True)
class IndexConfig:
    """How to index a corpus.

    ``batch_size``: images per ``encode_images`` call. ``workers``: decode threads.
    ``lookahead``: decoded images allowed in flight ahead of the embedder (bounds memory).
    ``commit_every``: images processed between commit points (each rewrites the FAISS files).
    ``commit_fraction``: a commit point also waits until the changes reach this fraction of the
    index size, so rewriting whole FAISS files costs O(N) over a large run, not O(N^2).
    ``commit_interval_s`` (``--commit-interval``): and at least this many seconds after the
    previous one, so a fast GPU run does not spend its time rewriting FAISS files (a crash then
    loses at most about that much work).
    ``max_pixels``: larger images are recorded as ``oversized`` (decompression-bomb guard; the
    limit is exact, Pillow's own default does not apply). ``max_file_bytes``: larger files are
    recorded as ``file_too_large`` without being read. ``max_aspect``: images longer than this
    many times their short side are centre-cropped to it before any resize (bounds the
    preprocess's memory; a Resize + CenterCrop model sees the same central square).
    ``rehash``: re-read and re-hash files whose size and mtime are unchanged (content edited in
    place with its timestamps restored), and retry every file recorded as bad.
    ``factory``: FAISS factory string ("Flat", "IVF256,Flat", "HNSW32", ...), inner product; or
    "auto" / "auto:<--index-budget>" (``indexing.faiss_factory``: Flat, then a planned IVF-PQ).
    ``jpeg_draft``: decode JPEGs at a reduced DCT scale no smaller than the encoders' input
    (fast for large photos; pixels differ slightly from a full decode, so off by default).
    ``decode`` (``--decode``): ``"auto"`` decodes JPEGs in batches with nvJPEG and preprocesses
    them on the GPU when every encoder runs on one CUDA device (``indexing.gpu_decode``), else
    uses Pillow on CPU threads; ``"cpu"`` always Pillow; ``"gpu"`` always the batched torch path
    on the encoders' device (an error when it cannot serve them).
    ``train_min``: vectors needed before a trainable factory is trained; below it the index
    stays exact (Flat).
    ``encode_ahead`` (``--encode-ahead``): batches left queued on the encoders (a GPU) while the
    host prepares the next one. 1 is enough when the host is always faster than the device; 2
    keeps the device busy through the host's uneven moments (a commit, a slow read, the thread
    that issues the device work waiting for the GIL), at the cost of one more batch of device
    memory. A CPU encoder encodes at once, so this changes nothing there.
    ``read_processes`` (``--read-processes``): on the GPU path, read, hash and check the files in
    this many processes instead of threads of the indexing process (0, the default: threads),
    so that the readers' Python does not compete for the GIL with the thread that feeds the GPU.
    GPU path and local engine only. multiprocessing starts them (forkserver), which imports the
    main module first: a script that calls ``index_corpus`` with it needs the
    ``if __name__ == "__main__":`` guard, or its top level runs again in the reader processes
    (which then fail, and the threads take over, with a warning).
    """

    batch_size: int = 64
    workers: int = 4
    lookahead: int = 0  # 0 -> 4 * batch_size
    commit_every: int = 1024
    commit_fraction: float = 0.1
    commit_interval_s: float = 0.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_aspect: float = DEFAULT_MAX_ASPECT
    extensions: tuple[str, ...] = field(default=DEFAULT_EXTENSIONS)
    factory: str = "Flat"
    train_min: int = 0  # 0 -> 39 * nlist for IVF, 1 otherwise
    follow_symlinks: bool = True
    jpeg_draft: bool = False
    rehash: bool = False
    decode: str = "auto"
    encode_ahead: int = 2
    read_processes: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers", "commit_every", "max_pixels", "max_file_bytes", "encode_ahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} (--{name.replace('_', '-')}) must be >= 1, "
                                 f"got {getattr(self, name)}")
        if not self.max_aspect >= 1.0:  # also refuses NaN
            raise ValueError(f"IndexConfig.max_aspect (--max-aspect) must be >= 1, got {self.max_aspect}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"IndexConfig.decode (--decode) must be one of {DECODE_MODES}, got {self.decode!r}")
        if not 0.0 <= self.commit_interval_s < float("inf"):
            raise ValueError(f"IndexConfig.commit_interval_s (--commit-interval) must be >= 0 seconds, got {self.commit_interval_s}")
        if not 0.0 <= self.commit_fraction <= 1.0:
            raise ValueError(f"IndexConfig.commit_fraction must be in [0, 1], got {self.commit_fraction}")
        if self.read_processes < 0:
            raise ValueError(f"IndexConfig.read_processes must be >= 0, got {self.read_processes}")
        if self.lookahead < 0 or self.train_min < 0:
            raise ValueError("IndexConfig.lookahead and train_min must be >= 0")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions)
        if not exts:
            raise ValueError("IndexConfig.extensions must not be empty")
        object.__setattr__(self, "extensions", exts)
        if not self.factory.strip():
            raise ValueError("IndexConfig.factory must not be empty")

    @property
    def effective_lookahead(self) -> int:
        return self.lookahead or 4 * self.batch_size
