"""Several g_OO(r) curves (rdf.csv files of water_nvt.py or `e2former rdf`) over one experiment, one figure.

    python -m benchmarks.plot_rdf_comparison \\
        examples/results/water_nvt_full/rdf.csv="corrected labels: h2, shipped (50 ps)" \\
        examples/results/water_nvt_full_d2a/rdf.csv="corrected labels: d2a, shipped before (50 ps)" \\
        examples/results/water_nvt_full_b1/rdf.csv="corrected labels: b1, shipped before d2a (50 ps)" \\
        examples/results/water_nvt_full_stratified_s1/rdf.csv="labels as computed: s1, b1's twin (10 ps)" \\
        examples/results/water_nvt_full_z1/rdf.csv="labels as computed: z1, shipped before b1 (50 ps)" \\
        --out examples/results/rdf_label_correction.png
"""

from __future__ import annotations

import argparse

import numpy as np

from e2former_calc.rdf import EXPERIMENTS, load_experimental_rdf, plot_rdf_curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", nargs="+", metavar="CSV=LABEL", help="an rdf.csv file and its legend label")
    parser.add_argument("--experiment", choices=EXPERIMENTS, default="skinner2013")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)

    curves = []
    for curve in args.curves:
        path, _, label = curve.partition("=")
        r, g = np.loadtxt(path, delimiter=",", comments="#").T
        curves.append((label or path, r, g))
    plot_rdf_curves(args.out, curves, load_experimental_rdf(args.experiment), title=args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
