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


DESCRIBE = "describe"  # the synthetic task's descriptions, where the kept tokens' spatial coverage shows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against kept tokens, one line per method and layer; beside it the descriptions'
    accuracy alone where the rows have them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy (%)", lambda r: r["accuracy"])]
    if any(DESCRIBE in r["per_type"] for r in rows):
        panels.append(("descriptions right (%)", lambda r: r["per_type"].get(DESCRIBE, float("nan"))))
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), dpi=120, squeeze=False)
    baseline = next((r for r in rows if r["method"] == "none"), None)
    lines = dict.fromkeys((r["method"], r["layer"]) for r in rows if r["method"] != "none")
    several_layers = len({layer for _, layer in lines}) > 1
    # One colour per method, one line style per layer: more lines than a colour cycle has stay apart.
    colours = {method: f"C{i % 10}" for i, method in enumerate(dict.fromkeys(m for m, _ in lines))}
    styles = {layer: ("-", "--", ":", "-.")[i % 4] for i, layer in enumerate(sorted({layer for _, layer in lines}, key=str, reverse=True))}
    for ax, (label, value) in zip(axes[0], panels):
        if baseline:
            ax.axhline(100 * value(baseline), color="grey", linestyle="--", label=f"none ({baseline['kept_tokens']:.0f} tokens)")
        for method, layer in lines:
            points = sorted((r["kept_tokens"], 100 * value(r)) for r in rows if (r["method"], r["layer"]) == (method, layer))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colours[method], linestyle=styles[layer], label=f"{method} K={layer}" if several_layers else method)
        ax.set_xlabel("vision tokens kept")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_title(title)
    axes[0][-1].legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
