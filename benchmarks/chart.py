"""The benchmark's PNG: throughput and peak memory per rank, shardtrain beside the reference, and scaling.

Bars are the medians over run.py's rounds; the whiskers span each side's lowest and highest round.
"""

from __future__ import annotations

from pathlib import Path


def write_chart(report: dict, path: Path) -> Path | None:
    """Draw ``report`` (run.py's results.json) into ``path``; None, with a hint, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed (pip install 'shardtrain[bench]')")
        return None
    names = list(report["configs"])
    panels = 3 if report.get("scaling") else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    width = 0.38
    positions = range(len(names))
    for axis, key, scale, label in (
        (axes[0], "tokens_per_sec", 1.0, "tokens/s (higher is better)"),
        (axes[1], "peak_memory_per_rank_bytes", 2**-20, "peak memory per rank, MiB (lower is better)"),
    ):
        for offset, side, color in ((-width / 2, "reference", "#9e9e9e"), (width / 2, "shardtrain", "#1f77b4")):
            figures = [report["configs"][n][side] for n in names]
            values = [f[key] * scale for f in figures]
            spread = _range_bars(figures, key, scale)
            bars = axis.bar(
                [p + offset for p in positions], values, width, label=side, color=color, yerr=spread, capsize=3
            )
            axis.bar_label(bars, fmt="%.0f", fontsize=7)
        axis.set_xticks(list(positions), names)
        axis.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    if panels == 3:
        axis = axes[2]
        for name, runs in report["scaling"].items():
            devices = [int(d) for d in runs]
            axis.plot(devices, [r["peak_memory_per_rank_bytes"] / 2**20 for r in runs.values()], marker="o", label=name)
        axis.set_xticks(sorted({int(d) for runs in report["scaling"].values() for d in runs}))
        axis.set_xlabel("processes")
        axis.set_title("shardtrain peak memory per rank, MiB", fontsize=10)
        axis.legend(fontsize=8)
    figure.suptitle(
        f"{report['model']}, {report['devices']} processes, {report['precision']}: shardtrain vs hand-written reference",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _range_bars(figures: list[dict], key: str, scale: float) -> list[list[float]] | None:
    """Whiskers from the median down to the lowest round and up to the highest (None without rounds)."""
    if not all(f"{key}_range" in f for f in figures):
        return None
    below = [(f[key] - f[f"{key}_range"][0]) * scale for f in figures]
    above = [(f[f"{key}_range"][1] - f[key]) * scale for f in figures]
    return [below, above]
