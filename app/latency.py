"""Per-session latency bookkeeping and its chart, without Gradio.

:class:`LatencyTracker` keeps the last queries' latencies per precision; :func:`latency_chart`
draws their rolling p50/p95 as a small inline SVG (the UI shows it in ``gr.HTML``).
"""
from __future__ import annotations

import html
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipfp8.app.search import Latency, SearchResult

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


@dataclass
class LatencyTracker:
    """Latency series per precision, bounded to the last ``maxlen`` queries.

    ``percentiles`` summarise the retained series; the chart points are rolling p50/p95 of the
    total latency over the trailing ``window`` queries, computed once when a query is recorded
    (so drawing the chart costs O(points), not a percentile per point per query).
    """

    maxlen: int = 500
    window: int = 50
    _series: dict[str, deque[Latency]] = field(default_factory=dict)
    _points: dict[str, deque[tuple[int, float, float]]] = field(default_factory=dict)
    _count: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.maxlen < 1 or self.window < 1:
            raise ValueError(f"LatencyTracker: maxlen and window must be >= 1, got {self.maxlen}, {self.window}")

    def record(self, result: SearchResult) -> None:
        for label, pr in result.results.items():
            series = self._series.setdefault(label, deque(maxlen=self.maxlen))
            series.append(pr.latency)
            self._count[label] = self._count.get(label, 0) + 1
            recent = [lat.total_ms for lat in list(series)[-self.window:]]
            p50, p95 = np.percentile(recent, [50, 95])
            self._points.setdefault(label, deque(maxlen=self.maxlen)).append(
                (self._count[label], float(p50), float(p95)))

    def points(self, precision: str) -> list[tuple[int, float, float]]:
        """(query number, rolling p50 ms, rolling p95 ms) per recorded query of ``precision``."""
        return list(self._points.get(precision, ()))

    def series(self, precision: str, part: str = "total_ms") -> list[float]:
        return [getattr(lat, part) for lat in self._series.get(precision, ())]

    def percentiles(self, precision: str, part: str = "total_ms") -> dict[str, float]:
        """{"n", "p50", "p95"} of the retained series (NaN percentiles when empty)."""
        s = self.series(precision, part)
        if not s:
            return {"n": 0, "p50": float("nan"), "p95": float("nan")}
        return {"n": len(s), "p50": float(np.percentile(s, 50)), "p95": float(np.percentile(s, 95))}

    def running_rows(self) -> Iterator[dict[str, Any]]:
        """Chart rows: (query number, "<precision> p50|p95", rolling ms) per recorded query."""
        for label, points in self._points.items():
            for n, p50, p95 in points:
                yield {"query": n, "series": f"{label} p50", "ms": p50}
                yield {"query": n, "series": f"{label} p95", "ms": p95}


def nice_step(span: float, max_ticks: int, integer: bool = False) -> float:
    """A 1-2-5 x 10^n tick step giving at most ``max_ticks`` intervals over ``span``;
    at least 1 when ``integer``."""
    raw = max(span, 1e-9) / max(max_ticks, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return max(step, 1.0) if integer else step


def ticks(lo: float, hi: float, max_ticks: int, integer: bool = False) -> list[float]:
    """Tick values covering [lo, hi] on a nice step (integers only when ``integer``)."""
    step = nice_step(hi - lo, max_ticks, integer)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.3g}"


def latency_chart(tracker: LatencyTracker, labels: Sequence[str], width: int = 960, height: int = 230) -> str:
    """An inline SVG of the rolling p50 (solid) and p95 (dashed) total latency per precision
    against the query number: integer x ticks only, a marker on every point (so a precision with a
    single query already shows), and a one-line hint instead of empty axes before the first query.
    Drawn as text here (no plotting library, ~1 ms) and sent inline: no file is written."""
    title = f"Rolling p50 / p95 total latency, last {tracker.window} queries (ms)"
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
            f'role="img" aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">'
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>')
    series = [(i, label, tracker.points(label)) for i, label in enumerate(labels) if tracker.points(label)]
    if not series:
        return (head + f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#666">'
                "No query yet: run a search to chart its latency.</text></svg>")
    longest = max(len(f"{label} p95") for _, label, _ in series)
    left, right, top, bottom = 56, width - 50 - 7 * longest, 28, height - 34  # room for the legend
    xs = [n for _, _, pts in series for n, _, _ in pts]
    x_lo, x_hi = min(xs) - 0.5, max(xs) + 0.5
    y_hi = max(p for _, _, pts in series for _, _, p in pts) * 1.1 or 1.0
    y_ticks = ticks(0.0, y_hi, 5)
    y_hi = max(y_hi, y_ticks[-1])

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - y / y_hi * (bottom - top)

    frame = f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>'
    out = [head, frame]
    for t in y_ticks:
        out.append(f'<line x1="{left}" x2="{right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text class="ytick" x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    for t in ticks(math.ceil(x_lo), math.floor(x_hi), 10, integer=True):
        out.append(f'<text class="xtick" x="{px(t):.1f}" y="{bottom + 15}" text-anchor="middle">{int(t)}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{height - 3}" text-anchor="middle">query number</text>'
               f'<text x="14" y="{(top + bottom) / 2}" transform="rotate(-90 14 {(top + bottom) / 2})" '
               'text-anchor="middle">ms</text>')
    for row, (i, label, pts) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        for col, (name, dash) in enumerate(((f"{label} p50", ""), (f"{label} p95", ' stroke-dasharray="5 3"'))):
            coords = [(px(n), py(p95 if col else p50)) for n, p50, p95 in pts]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            out.append(f'<polyline class="series" data-series="{html.escape(name)}" points="{path}" fill="none" '
                       f'stroke="{colour}" stroke-width="1.5"{dash} opacity="{0.6 if col else 1}"/>')
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in coords[-60:])
            ly = top + 12 + 16 * (2 * row + col)
            out.append(f'<line x1="{right + 10}" x2="{right + 30}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
                       f'stroke-width="1.5"{dash}/><text x="{right + 36}" y="{ly}">{html.escape(name)}</text>')
    return "".join(out) + "</svg>"
