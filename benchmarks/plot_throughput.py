"""Figure of a bench_throughput.py result: steps/s and peak GPU memory (GB) versus atoms, log-log.

One colour per model, solid lines for conservative forces and dashed for direct ones. A case that
ran out of memory is a cross: on the memory panel at the GPU's memory, on the throughput panel at
the bottom edge, at its N.

    python -m benchmarks.plot_throughput throughput.json --out throughput.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

LINESTYLE = {"conservative": "-", "direct": "--"}


def grouped_rows(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (model, mode), in first-seen order, each list sorted by atom count."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["mode"]), []).append(row)
    return {key: sorted(value, key=lambda r: r["num_atoms"]) for key, value in groups.items()}


def plot(data: dict, out: Path) -> None:
    """Write the two-panel figure of `data` (the JSON document) to `out` (PNG)."""
    figure, (rate_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 5))
    gpu_gb = data.get("environment", {}).get("gpu_memory_gb")
    colours = {}
    for (model, mode), rows in grouped_rows(data["rows"]).items():
        colour = colours.setdefault(model, f"C{len(colours) % 10}")
        ok = [r for r in rows if r.get("status") == "ok"]
        label = f"{model}, {mode}"
        style = {"color": colour, "linestyle": LINESTYLE.get(mode, ":"), "marker": "o", "markersize": 4}
        if ok:
            atoms = [r["num_atoms"] for r in ok]
            rate_axis.plot(atoms, [r["steps_per_s"] for r in ok], label=label, **style)
            if all(r.get("peak_gb") is not None for r in ok):
                memory_axis.plot(atoms, [r["peak_gb"] for r in ok], label=label, **style)
        for row in (r for r in rows if r.get("status") == "OOM"):
            bottom = blended_transform_factory(rate_axis.transData, rate_axis.transAxes)
            rate_axis.plot(row["num_atoms"], 0.03, "x", color=colour, markersize=9, mew=2, transform=bottom)
            if gpu_gb:
                memory_axis.plot(row["num_atoms"], gpu_gb, "x", color=colour, markersize=9, mew=2)
    for axis, ylabel in ((rate_axis, "steps / s (energy + forces)"), (memory_axis, "peak GPU memory (GB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("atoms (FCC carbon, 6 Å cutoff)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    if gpu_gb:
        memory_axis.axhline(gpu_gb, color="grey", linestyle=":", linewidth=1)
    handles, labels = rate_axis.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", marker="x", linestyle="none", markersize=9, mew=2))
    labels.append("out of memory")
    memory_axis.legend(handles, labels, fontsize=8, loc="lower right")
    environment = data.get("environment", {})
    figure.suptitle(f"{environment.get('device', '')}  ·  commit {str(environment.get('commit', ''))[:10]}  ·  "
                    f"{str(environment.get('date', ''))[:10]}", fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=150)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="JSON written by bench_throughput.py")
    parser.add_argument("--out", type=Path, help="PNG path (default: the JSON's path with .png)")
    args = parser.parse_args(argv)
    out = args.out or args.results.with_suffix(".png")
    plot(json.loads(args.results.read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
