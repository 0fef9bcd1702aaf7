"""``EvalReport``: results of ``evaluate``, as a side-by-side table, JSON and CSV.

Values are stored as fractions (0..1) in JSON/CSV. The table shows accuracy/recall/overlap
metrics in percent with deltas in percentage points (each encoder minus the baseline, the first
column), and cosine/Spearman agreement as plain numbers.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipfp8.quant.core.fileio import atomic_write_text, portable_path

#: Metrics shown as fractions (cosines, correlations) rather than percentages.
_PLAIN = ("image_cosine", "text_cosine", "score_spearman")
CSV_FIELDS = ("dataset", "kind", "section", "metric", "encoder", "value", "delta_vs_baseline", "baseline")
#: The checkout these modules live in: written results name dataset paths relative to it (e.g.
#: ``../shared/data/eval/flickr8k-1k``), never this machine's absolute paths, where they can.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DatasetResult:
    """One dataset's metrics per encoder label, and each non-baseline encoder's agreement."""

    name: str
    kind: str
    path: str
    n_images: int
    n_texts: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    """``encoders``: identity dicts (with ``label``), baseline first; ``datasets``: results."""

    encoders: list[dict[str, Any]]
    datasets: list[DatasetResult]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [e["label"] for e in self.encoders]

    @property
    def baseline(self) -> str:
        return self.labels[0]

    def result(self, dataset: str) -> DatasetResult:
        for r in self.datasets:
            if r.name == dataset:
                return r
        raise KeyError(f"no dataset {dataset!r} in this report")

    def delta(self, dataset: str, metric: str, label: str) -> float:
        """``label``'s metric minus the baseline's on ``dataset``."""
        m = self.result(dataset).metrics
        return m[label][metric] - m[self.baseline][metric]

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "encoders": self.encoders, "settings": self.settings,
                "datasets": [asdict(r) for r in self.datasets]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        return cls(encoders=d["encoders"], datasets=[DatasetResult(**r) for r in d["datasets"]],
                   settings=d.get("settings", {}))

    def rows(self) -> list[dict[str, Any]]:
        """Long-format rows (one per dataset, metric, encoder), the CSV's content."""
        out = []
        for r in self.datasets:
            base = r.metrics.get(self.baseline, {})
            for label in self.labels:
                for metric, value in r.metrics.get(label, {}).items():
                    delta = value - base[metric] if metric in base else float("nan")
                    out.append({"dataset": r.name, "kind": r.kind, "section": "metric", "metric": metric,
                                "encoder": label, "value": value, "delta_vs_baseline": delta,
                                "baseline": self.baseline})
                for metric, value in r.agreement.get(label, {}).items():
                    out.append({"dataset": r.name, "kind": r.kind, "section": "agreement", "metric": metric,
                                "encoder": label, "value": value, "delta_vs_baseline": "",
                                "baseline": self.baseline})
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return buf.getvalue()

    def format_table(self) -> str:
        """A Markdown table per dataset: metric rows, a value (+ delta) column pair per encoder."""
        blocks = []
        for r in self.datasets:
            header = ["metric", self.baseline]
            for label in self.labels[1:]:
                header += [label, f"Δ {label}"]
            lines = [f"**{r.name}** ({r.kind}, {r.n_images} images, {r.n_texts} texts)", "",
                     _md_row(header), _md_row(["---"] + ["---:"] * (len(header) - 1))]
            base = r.metrics.get(self.baseline, {})
            for metric in base:
                cells = [metric, _fmt(metric, base[metric])]
                for label in self.labels[1:]:
                    value = r.metrics.get(label, {}).get(metric, float("nan"))
                    cells += [_fmt(metric, value), _fmt(metric, value - base[metric], signed=True)]
                lines.append(_md_row(cells))
            agreement_metrics = list(dict.fromkeys(m for a in r.agreement.values() for m in a))
            for metric in agreement_metrics:
                cells = [f"{metric} (vs {self.baseline})", "—"]
                for label in self.labels[1:]:
                    cells += [_fmt(metric, r.agreement.get(label, {}).get(metric, float("nan"))), ""]
                lines.append(_md_row(cells))
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks) + "\n"

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``results.json`` and ``results.csv`` into ``out_dir`` atomically; return both paths.

        Dataset paths in the JSON are made portable (``quant.core.fileio.portable_path``: relative
        to the checkout when under it or beside it, e.g. ``../shared/...``), so results can be committed.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
        d = self.to_dict()
        for r in d["datasets"]:
            r["path"] = portable_path(r["path"], SOURCE_ROOT) if r["path"] else r["path"]
        atomic_write_text(json_path, json.dumps(_json_safe(d), indent=2) + "\n")
        atomic_write_text(csv_path, self.to_csv())
        return json_path, csv_path


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(metric: str, value: float, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if metric in _PLAIN:  # 5 decimals: FP8 vs FP16 cosines differ in the 3rd-4th decimal
        return f"{value:+.5f}" if signed else f"{value:.5f}"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _json_safe(x: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


__all__ = ["DatasetResult", "EvalReport", "CSV_FIELDS"]
