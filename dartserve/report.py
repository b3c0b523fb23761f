"""Writing evaluation rows as JSON, a markdown table and a plot of accuracy against kept tokens."""

from __future__ import annotations

import json
from pathlib import Path


def write_reports(rows: list[dict], out_dir: Path, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "markdown": out_dir / "eval.md", "plot": out_dir / "eval.png"}
    paths["json"].write_text(json.dumps(rows, indent=2))
    paths["markdown"].write_text(markdown_table(rows, title))
    plot(rows, paths["plot"], title)
    return paths


def markdown_table(rows: list[dict], title: str) -> str:
    types = sorted({t for row in rows for t in row["per_type"]})
    header = ["method", "budget", "K", "kept tokens", "accuracy", "relative", *types, "prefill ms"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        relative = "–" if row["relative_accuracy"] is None else f"{100 * row['relative_accuracy']:.1f}%"
        cells = [
            row["method"],
            "–" if row["budget"] is None else str(row["budget"]),
            "–" if row["layer"] is None else str(row["layer"]),
            f"{row['kept_tokens']:.0f}",
            f"{100 * row['accuracy']:.1f}%",
            relative,
            *(f"{100 * row['per_type'][t]:.1f}%" if t in row["per_type"] else "–" for t in types),
            f"{row['prefill_ms']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nn = {rows[0]['n']} questions per row.\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    baseline = next((r for r in rows if r["method"] == "none"), None)
    if baseline:
        axes.axhline(100 * baseline["accuracy"], color="grey", linestyle="--", label=f"none ({baseline['kept_tokens']:.0f} tokens)")
    lines = dict.fromkeys((r["method"], r["layer"]) for r in rows if r["method"] != "none")
    several_layers = len({layer for _, layer in lines}) > 1
    for method, layer in lines:
        points = sorted((r["kept_tokens"], 100 * r["accuracy"]) for r in rows if (r["method"], r["layer"]) == (method, layer))
        label = f"{method} K={layer}" if several_layers else method
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel("vision tokens kept")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
