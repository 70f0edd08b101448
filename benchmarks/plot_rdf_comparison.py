"""Several g_OO(r) curves (rdf.csv files of water_nvt.py or `e2former rdf`) over one experiment, one figure.

    python -m benchmarks.plot_rdf_comparison \\
        examples/results/water_nvt_full_bsse_b1/rdf.csv="corrected labels (b1)" \\
        examples/results/water_nvt_full_stratified_s1/rdf.csv="labels as computed (s1)" \\
        --out examples/results/rdf_label_correction.png
"""

from __future__ import annotations

import argparse

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from e2former_calc.rdf import EXPERIMENTS, load_experimental_rdf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", nargs="+", metavar="CSV=LABEL", help="an rdf.csv file and its legend label")
    parser.add_argument("--experiment", choices=EXPERIMENTS, default="skinner2013")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)

    experiment = load_experimental_rdf(args.experiment)
    figure, axes = plt.subplots(figsize=(6.5, 4.2), dpi=150)
    shown = experiment.r <= 8.0
    axes.plot(experiment.r[shown], experiment.g[shown], color="black", lw=1.6, label=f"experiment ({experiment.name})")
    for curve in args.curves:
        path, _, label = curve.partition("=")
        r, g = np.loadtxt(path, delimiter=",", comments="#").T
        axes.plot(r, g, lw=1.3, label=label or path)
    axes.axhline(1.0, color="grey", lw=0.5, ls=":")
    axes.set(xlabel="r (Å)", ylabel="g$_{OO}$(r)", xlim=(2.0, 8.0), title=args.title)
    axes.legend(frameon=False)
    figure.tight_layout()
    figure.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
