"""What a run found, in three forms: the printed table with the issue-7 targets, a JSON file and a PNG chart."""

from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: cio_sync's FsspecWriter uploads a file to S3 in parts once it is at least two parts (part_size, 16 MiB).
MULTIPART_FROM = 2 * 16 * 2**20
#: How much peak RSS may grow from the smallest to the largest stream and still count as flat.
FLAT_RSS_TOLERANCE = 1.25


@dataclass
class CaseResult:
    """Every run of one case, and the figures drawn from them."""

    key: str
    label: str
    group: str  # "baseline", "advanced", "s3", "standard", "large", "memory", "outage"
    calls: int
    runs: list[float] = field(default_factory=list)  # calls/s, one per repetition
    peak_rss_mib: list[float] = field(default_factory=list)
    rss_start_mib: list[float] = field(default_factory=list)
    files: list[int] = field(default_factory=list)  # sizes of the files of the last run
    accounted_peak_mib: list[float] = field(default_factory=list)  # the sink's own count of what it held
    errors: list[str] = field(default_factory=list)
    #: The outage cases: the budget (MiB), what ended the run, the rows published once storage came back.
    outage: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None

    @property
    def same_traffic(self) -> bool:
        """Whether this case wrote the shared mixed-call slice, so a ratio to the baselines means something."""
        return self.group in ("baseline", "advanced", "s3")

    def as_dict(self, raw: float | None, dlt: float | None) -> dict[str, Any]:
        median = self.median
        peak = max(self.peak_rss_mib) if self.peak_rss_mib else None
        start = min(self.rss_start_mib) if self.rss_start_mib else None
        budget = self.outage.get("budget_mib")
        memory: dict[str, Any] = {}
        if self.group == "outage":
            memory = {
                "budget_mib": budget, "stopped_by": self.outage.get("stopped_by"),
                "published_rows": self.outage.get("published_rows"),
                # What the issue asks: peak RSS against max_buffer_bytes, above what the process held before.
                "peak_rss_above_start_per_budget": (peak - start) / budget if peak and start and budget else None,
                "peak_rss_per_budget": peak / budget if peak and budget else None,
            }
        return {
            "key": self.key, "label": self.label, "group": self.group, "calls": self.calls, "runs": self.runs,
            "min": min(self.runs) if self.runs else None, "median": median,
            "max": max(self.runs) if self.runs else None,
            "ratio_to_raw_pyarrow": _ratio(median, raw) if self.same_traffic else None,
            "ratio_to_dlt": _ratio(median, dlt) if self.same_traffic else None,
            "peak_rss_mib": max(self.peak_rss_mib) if self.peak_rss_mib else None,
            "sink_accounted_peak_mib": max(self.accounted_peak_mib) if self.accounted_peak_mib else None,
            "rss_start_mib": min(self.rss_start_mib) if self.rss_start_mib else None,
            "files": len(self.files), "largest_file_bytes": max(self.files, default=0),
            "total_file_bytes": sum(self.files), "errors": self.errors, **memory,
        }


def _ratio(value: float | None, to: float | None) -> float | None:
    return value / to if value is not None and to else None


def _fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def table(rows: list[dict[str, Any]]) -> str:
    """The results as aligned text, one line per case."""
    lines = [f"{'case':<46} {'calls':>10} {'min':>9} {'median':>9} {'max':>9} {'x raw':>6} {'x dlt':>6} "
             f"{'RSS MiB':>8} {'largest file':>12}"]
    for r in rows:
        largest = f"{r['largest_file_bytes'] / 2**20:,.1f} MiB" if r["files"] else "-"
        line = (f"{r['label']:<46} {r['calls']:>10,} {_fmt(r['min'], ',.0f', 9)} {_fmt(r['median'], ',.0f', 9)} "
                f"{_fmt(r['max'], ',.0f', 9)} {_fmt(r['ratio_to_raw_pyarrow'], '.2f', 6)} "
                f"{_fmt(r['ratio_to_dlt'], '.1f', 6)} {_fmt(r['peak_rss_mib'], ',.0f', 8)} {largest:>12}")
        if r["errors"]:
            line += f"  FAILED: {r['errors'][0][:200]}"
        lines.append(line)
    return "\n".join(lines)


def _status(value: float | None, ok: bool) -> str:
    return "not measured" if value is None else ("met" if ok else "NOT met")


def targets(by_key: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 7's targets, each judged on the figures of this run (medians)."""

    def median(key: str) -> float | None:
        row = by_key.get(key)
        return row["median"] if row else None

    found: list[dict[str, Any]] = []

    def judge(target: str, value: float | None, threshold: float, figures: str, *, at_most: bool = False) -> None:
        ok = value is not None and (value <= threshold if at_most else value >= threshold)
        found.append({"target": target, "value": value, "threshold": threshold, "status": _status(value, ok),
                      "figures": figures})

    raw, dlt, parquet = median("raw-pyarrow"), median("dlt"), median("parquet")
    ratio = _ratio(parquet, raw)
    judge("Advanced parquet, dicts in, local >= 0.8x raw pyarrow", ratio, 0.8,
          f"{_n(parquet)} vs {_n(raw)} calls/s = {_x(ratio)}")
    ratio = _ratio(parquet, dlt)
    judge("Advanced parquet, dicts in, local >= 10x dlt", ratio, 10.0,
          f"{_n(parquet)} vs {_n(dlt)} calls/s = {_x(ratio)}")
    for mode in ("os", "interval", "always"):
        spool = median(f"spool-{mode}")
        ratio = _ratio(spool, raw)
        judge(f"spool on (sync={mode}) >= 0.5x raw pyarrow", ratio, 0.5,
              f"{_n(spool)} vs {_n(raw)} calls/s = {_x(ratio)}")
    standard = median("standard-1000")
    judge("Standard identify, SQLite state (commit_every=1000) >= 50k calls/s", standard, 50_000,
          f"{_n(standard)} calls/s (commit_every=1: {_n(median('standard-1'))} calls/s)")
    as_bytes = median("parquet-bytes")
    ratio = _ratio(as_bytes, parquet)
    judge("JSON bytes in not slower than dicts in (parquet)", ratio, 1.0,
          f"{_n(as_bytes)} vs {_n(parquet)} calls/s = {_x(ratio)}")
    memory = sorted((row for row in by_key.values() if row["group"] == "memory" and row["peak_rss_mib"]),
                    key=lambda row: row["calls"])
    if len(memory) >= 2:
        small, big = memory[0], memory[-1]
        ratio = big["peak_rss_mib"] / small["peak_rss_mib"]
        figures = (f"peak RSS {small['peak_rss_mib']:,.0f} MiB at {small['calls']:,} calls, "
                   f"{big['peak_rss_mib']:,.0f} MiB at {big['calls']:,} calls = {_x(ratio)}")
    else:
        ratio, figures = None, "needs two stream sizes (--rss-calls)"
    judge(f"peak RSS flat as the stream grows (<= {FLAT_RSS_TOLERANCE}x)", ratio, FLAT_RSS_TOLERANCE, figures,
          at_most=True)
    return found


def comparisons(by_key: dict[str, dict[str, Any]]) -> list[str]:
    """S3 against local disk, memory growth, memory with storage down, and whether the large files went up in
    parts."""
    lines = []
    for s3, local, what in (("s3-parquet", "parquet", "parquet"), ("large-s3", "large-local", "large json files")):
        if s3 in by_key and local in by_key and by_key[s3]["median"] and by_key[local]["median"]:
            lines.append(f"S3 vs local, {what}: {by_key[s3]['median']:,.0f} vs {by_key[local]['median']:,.0f} "
                         f"calls/s = {by_key[s3]['median'] / by_key[local]['median']:.2f}x")
    for row in sorted((r for r in by_key.values() if r["group"] == "memory"), key=lambda r: r["calls"]):
        if row["peak_rss_mib"]:
            lines.append(f"memory growth, {row['calls']:,} calls: peak RSS {row['peak_rss_mib']:,.0f} MiB "
                         f"({row['rss_start_mib'] or 0:,.0f} MiB before the first call; the sink counted at most "
                         f"{row['sink_accounted_peak_mib'] or 0:,.0f} MiB in memory), {row['files']} files")
    for row in (r for r in by_key.values() if r["group"] == "outage"):
        if row["peak_rss_mib"] and row["peak_rss_above_start_per_budget"] is not None:
            lines.append(
                f"{row['label']}: {row['calls']:,} calls accepted ({row['stopped_by']}); peak RSS "
                f"{row['peak_rss_mib']:,.0f} MiB, {row['peak_rss_mib'] - row['rss_start_mib']:,.0f} MiB above the "
                f"{row['rss_start_mib']:,.0f} MiB before the sink opened = "
                f"{row['peak_rss_above_start_per_budget']:.2f}x max_buffer_bytes ({row['budget_mib']:g} MiB); the "
                f"sink counted at most {row['sink_accounted_peak_mib'] or 0:,.1f} MiB")
    large = by_key.get("large-s3")
    if large and large["files"]:
        biggest = large["largest_file_bytes"]
        parts = "so it went up in multipart" if biggest >= MULTIPART_FROM else "below the multipart threshold"
        lines.append(f"largest file to S3: {biggest / 2**20:,.1f} MiB ({parts}, 8 parts at a time; cio_sync "
                     f"splits files of {MULTIPART_FROM / 2**20:.0f} MiB and more)")
    return lines


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Median calls/s per case as horizontal bars, min-max as error bars, the 0.8x and 0.5x raw pyarrow targets as
    lines. Returns None without matplotlib (a bench extra)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shown = [r for r in rows if r["median"]]
    colours = {"baseline": "#7f7f7f", "advanced": "#1f77b4", "s3": "#ff7f0e", "standard": "#2ca02c",
               "large": "#9467bd", "memory": "#8c564b", "outage": "#e377c2"}
    figure, axes = plt.subplots(figsize=(11, 0.42 * len(shown) + 1.8))
    positions = list(range(len(shown)))[::-1]
    medians = [r["median"] for r in shown]
    errors = [[r["median"] - r["min"] for r in shown], [r["max"] - r["median"] for r in shown]]
    axes.barh(positions, medians, xerr=errors, capsize=3,
              color=[colours.get(r["group"], "#333333") for r in shown])
    axes.set_yticks(positions, [f"{r['label']} ({r['calls']:,})" for r in shown], fontsize=8)
    for y, r in zip(positions, shown, strict=True):
        axes.text(r["max"], y, f"  {r['median']:,.0f}", va="center", fontsize=7)
    raw = next((r["median"] for r in shown if r["key"] == "raw-pyarrow"), None)
    if raw:
        for share, style in ((0.8, "--"), (0.5, ":")):
            axes.axvline(raw * share, color="#d62728", linestyle=style, linewidth=1,
                         label=f"{share}x raw pyarrow ({raw * share:,.0f}/s)")
        axes.legend(loc="lower right", fontsize=8)
    axes.set_xscale("log")  # from an fsync per call to orjson's hundreds of thousands
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    axes.set_xlabel("calls/s, log scale (median of the runs; bars span min to max)")
    axes.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    axes.margins(x=0.15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def print_targets(title: str, found: list[dict[str, Any]]) -> None:
    """The targets a run checked, one line each: ``[ met ]`` or ``[ NOT met ]``, the target, the figures."""
    print(f"\n{title}, this run:")
    for t in found:
        print(f"  [{t['status']:^12}] {t['target']}: {t['figures']}")
