"""PNG figures of results (matplotlib, Agg backend): bar charts, evaluation per layer, the demo's plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(
    path: str | Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str
) -> Path:
    """Grouped bar chart (one group per label, one bar per series) as PNG; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(labels) * max(1, len(series)) + 2), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    top = max((v for values in series.values() for v in values), default=1.0)
    ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)  # room for the legend above the bars
    ax.legend(loc="upper right", ncol=len(series), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_evaluation(results: dict[str, Any], path: str | Path) -> Path:
    """Per MoE layer: activated experts (against the model's top-k) and MaxVio (against Top-K).

    Takes :func:`~hf_moe_routing.evaluation.evaluate.evaluate_routing` output. Both panels matter: a
    balancing routing (BIP) keeps every token at k experts, so its change shows in the MaxVio panel.
    Long routing names are wrapped; the legend sits below the panels, apart from titles and bars.
    """
    plt = _pyplot()
    fig = evaluation_figure(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluation_figure(results: dict[str, Any]) -> Any:
    """The matplotlib figure of :func:`plot_evaluation` (the caller closes it)."""
    import textwrap

    plt = _pyplot()
    layers = list(results["activated_per_layer"])
    x = list(range(len(layers)))
    topk_vio = (results.get("topk") or {}).get("max_vio_per_layer") or {}
    width_in = max(7.0, 0.7 * len(layers) + 4)
    chars = int(width_in * 11)  # characters of 9-point text per line of the figure's width
    name = textwrap.fill(str(results["routing"]), chars, break_long_words=True, break_on_hyphens=False)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(width_in, 3.6 + 0.15 * name.count("\n")), layout="constrained"
    )
    label = textwrap.fill(str(results["routing"]), chars // 2, break_long_words=True, break_on_hyphens=False)
    left.bar(x, [results["activated_per_layer"][i] for i in layers], color="tab:blue", label=label)
    left.axhline(results["top_k"], color="tab:red", linestyle="--", label=f"Top-K (k={results['top_k']})")
    left.set_ylim(0, results["top_k"] * 1.15)
    left.set_ylabel("mean activated routed experts")
    left.set_title(f"experts: {results['mean_activated']:.2f} of {results['top_k']}", fontsize=10)
    width = 0.4 if topk_vio else 0.8
    right.bar(
        [i - width / 2 if topk_vio else i for i in x],
        [results["max_vio_per_layer"][i] for i in layers],
        width,
        color="tab:blue",
    )
    if topk_vio:
        right.bar(
            [i + width / 2 for i in x],
            [topk_vio[i] for i in layers],
            width,
            color="tab:gray",
            label="Top-K (MaxVio)",
        )
    top = max([*results["max_vio_per_layer"].values(), *topk_vio.values(), 0.1])
    right.set_ylim(0, top * 1.15)
    right.set_ylabel("MaxVio (load imbalance)")
    right.set_title(f"balance: AvgMaxVio {results['avg_max_vio']:.3f}", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(x, layers)
        ax.set_xlabel("MoE layer")
        ax.grid(True, axis="y", alpha=0.3)
    handles = [*left.get_legend_handles_labels()[0], *right.get_legend_handles_labels()[0]]
    labels = [*left.get_legend_handles_labels()[1], *right.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle(f"{name}\nperplexity {results['perplexity']:.3f}", fontsize=9)
    return fig


def write_demo_plots(out: Path, report: dict[str, Any], pretrain_result: Any = None) -> list[str]:
    """The demo's PNG figures under ``out/plots``; returns their paths relative to ``out``."""
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    if pretrain_result is not None:
        from ..training.pretrain import plot_max_vio

        plot_max_vio({"Top-K pre-training": pretrain_result}, plots / "pretrain_max_vio.png", title="MaxVio")
        written.append("plots/pretrain_max_vio.png")
    bip, adak = report["bip"], report["adak"]
    layers = list(bip["max_vio_per_layer"])
    bar_plot(
        plots / "bip_max_vio_per_layer.png",
        [f"layer {i}" for i in layers],
        {
            "Top-K": [bip["topk_max_vio_per_layer"][i] for i in layers],
            "BIP": [bip["max_vio_per_layer"][i] for i in layers],
        },
        "MaxVio on held-out text",
        "Expert load imbalance (lower is better)",
    )
    written.append("plots/bip_max_vio_per_layer.png")
    layers = list(adak["activated_per_layer"])
    bar_plot(
        plots / "adak_experts_per_layer.png",
        [f"layer {i}" for i in layers],
        {"Top-K": [adak["top_k"]] * len(layers), "Ada-K": [adak["activated_per_layer"][i] for i in layers]},
        "routed experts per token",
        "Activated experts per layer",
    )
    written.append("plots/adak_experts_per_layer.png")
    if report.get("experts_by_word_class"):
        classes = report["experts_by_word_class"]
        bar_plot(
            plots / "adak_experts_per_word_class.png",
            list(classes),
            {"Top-K": [adak["top_k"]] * len(classes), "Ada-K": list(classes.values())},
            "routed experts per token",
            "Where the experts go",
        )
        written.append("plots/adak_experts_per_word_class.png")
    return written
