"""``clipfp8 index --watch``: index a corpus, then keep it indexed while files come and go.

Each batch of file-system changes (``watchfiles``: inotify/FSEvents/ReadDirectoryChangesW, or
polling with ``WATCHFILES_FORCE_POLLING=1`` on network file systems) triggers another
``index_corpus`` pass. A pass is incremental, so the watcher needs no rules of its own: new,
changed, moved and deleted files are found exactly as a manual re-run would find them, and a
pass interrupted by Ctrl+C resumes from its last commit point on the next run.

Changes are debounced: a pass starts once ``quiet_ms`` pass without a new change (or after
``debounce_ms`` of continuous changes, so a long copy is indexed as it goes). Files that are
not images (by extension) and everything inside the index directory are ignored.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipfp8.indexing.config import DEFAULT_EXTENSIONS, IndexConfig
from clipfp8.indexing.pipeline import Encoders, IndexSummary, Progress, index_corpus
from clipfp8.indexing.scan import check_corpus
from clipfp8.quant.core.encoder import Encoder

log = logging.getLogger(__name__)

#: ``on_pass(summary, changed_paths)``: called after every pass; the first pass has no paths.
PassCallback = Callable[[IndexSummary, list[str]], None]


@dataclass(frozen=True)
class WatchConfig:
    """Debouncing, in milliseconds: a pass starts after ``quiet_ms`` without a change, at the
    latest ``debounce_ms`` after the first one. ``poll``: poll instead of OS notifications."""

    debounce_ms: int = 1000
    quiet_ms: int = 250
    poll: bool = False

    def __post_init__(self) -> None:
        if self.quiet_ms < 1 or self.debounce_ms < self.quiet_ms:
            raise ValueError(f"WatchConfig: need 1 <= quiet_ms <= debounce_ms, got quiet_ms={self.quiet_ms}, "
                             f"debounce_ms={self.debounce_ms}")


def relevant_paths(changes: Iterable[tuple[object, str]], extensions: Sequence[str], index_dir: Path) -> list[str]:
    """The changed paths that can alter the index: image files (by extension, any case) and
    paths that are not existing files (deleted files, moved folders); never the index itself."""
    exts = tuple(e.lower() for e in extensions)
    index_dir = Path(index_dir).resolve()
    out = set()
    for _, raw in changes:
        path = Path(raw)
        if path == index_dir or index_dir in path.parents:
            continue
        if path.suffix.lower() in exts or not path.is_file():
            out.add(raw)
    return sorted(out)


def watch_corpus(corpus: str | Path, index_dir: str | Path, encoders: Encoders,
                 config: IndexConfig | None = None, watch: WatchConfig | None = None,
                 stop_event: threading.Event | None = None, on_pass: PassCallback | None = None,
                 progress: Progress | None = None, max_passes: int | None = None) -> int:
    """Index ``corpus`` into ``index_dir`` (``index_corpus``), then re-index after every batch of
    relevant changes until ``stop_event`` is set, ``max_passes`` passes ran, or Ctrl+C
    (``KeyboardInterrupt`` propagates: the caller decides how to stop). Returns the passes run.

    The watcher starts before the first pass, so files added during it trigger a second one.
    ``encoders`` may be a zero-argument callable (as for ``index_corpus``): it is called once,
    by the first pass, and its encoders serve every later pass.
    """
    import watchfiles

    root = check_corpus(corpus)
    cfg = config or IndexConfig()
    wcfg = watch or WatchConfig()
    index_path = Path(index_dir).resolve()
    extensions = cfg.extensions or DEFAULT_EXTENSIONS
    flt = watchfiles.DefaultFilter(ignore_paths=[str(index_path)])
    changes_iter = watchfiles.watch(root, watch_filter=flt, debounce=wcfg.debounce_ms, step=wcfg.quiet_ms,
                                    stop_event=stop_event, rust_timeout=max(wcfg.debounce_ms, 200),
                                    yield_on_timeout=True, force_polling=wcfg.poll or None)
    loaded: list[Encoder] = [] if callable(encoders) else list(encoders)

    def get_encoders() -> list[Encoder]:  # models load once, inside the first pass's lock
        if not loaded:
            loaded.extend(encoders())  # type: ignore[operator]  # callable(encoders) was checked when `loaded` was made
        return loaded

    passes = 0
    try:
        for changes in changes_iter:  # the first item (a timeout or changes) means: watching
            paths = relevant_paths(changes, extensions, index_path)
            if passes and not paths:
                continue
            if paths:
                log.debug("%d changed path(s), e.g. %s: re-indexing", len(paths), paths[0])
            summary = index_corpus(root, index_dir, get_encoders, config=cfg, progress=progress)
            passes += 1
            if on_pass is not None:
                on_pass(summary, paths)
            if (max_passes is not None and passes >= max_passes) or (stop_event is not None and stop_event.is_set()):
                break
    finally:
        changes_iter.close()
    return passes


__all__ = ["WatchConfig", "watch_corpus", "relevant_paths", "PassCallback"]
