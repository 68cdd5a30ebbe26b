"""The communication benchmark's derived columns and its accuracy-versus-bytes plot."""

from __future__ import annotations

from pathlib import Path


def round_(value: float, digits: int) -> float:
    """``value`` to ``digits`` significant digits (JSON-friendly)."""
    return float(f"{value:.{digits}g}")


def compare(rows: list[dict[str, object]]) -> None:
    """Add, per row, its upload saving, accuracy change and extra seconds against ``none``."""
    base = {r["secure_aggregation"]: r for r in rows if r["variant"] == "none"}
    clear = base[False]
    for row in rows:
        same = base[row["secure_aggregation"]]
        row["upload_reduction_vs_float32"] = round_(clear["bytes_up"] / row["bytes_up"], 3)
        row["upload_reduction_vs_same_mode"] = round_(same["bytes_up"] / row["bytes_up"], 3)
        row["accuracy_change_points"] = round_(100 * (row["accuracy"] - same["accuracy"]), 3)
        row["extra_seconds_per_round"] = round_(
            row["seconds_per_round"] - same["seconds_per_round"], 3
        )


def plot(rows: list[dict[str, object]], path: Path, *, title: str) -> None:
    """Accuracy against total upload bytes, one marker per variant, log-scale x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for secure, marker in ((False, "o"), (True, "s")):
        chosen = [r for r in rows if r["secure_aggregation"] == secure]
        label = "secure aggregation" if secure else "in the clear"
        axes.scatter(
            [r["bytes_up"] for r in chosen],
            [r["accuracy"] for r in chosen],
            marker=marker,
            label=label,
        )
        for r in chosen:
            axes.annotate(
                str(r["variant"]),
                (r["bytes_up"], r["accuracy"]),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            )
    axes.set_xscale("log")
    axes.set_xlabel("total bytes uploaded (all sites, all rounds)")
    axes.set_ylabel("final test accuracy")
    axes.set_title(f"{title}: accuracy vs upload bytes")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
