"""Matrix-product work of one energy + forces step, ours beside MACE, against a measured step time.

PyTorch's FLOP formulas (torch.utils.flop_counter.flop_registry: mm, bmm, addmm, the products inside
einsum, convolutions, attention) count the matrix products of one conservative step on the CPU, where our attention runs
its PyTorch reference (the same products the fused GPU kernel computes); elementwise work is not
counted. Ours: the paper size and the water preset at 6 Å (bench_throughput's e2former_configs). Counted on FCC carbon blocks of three sizes (bench_throughput's protocol: 6 Å cutoff, no
pbc), the counts are fitted as a·N + b·E (N atoms, E edges) and extrapolated to the 10k-atom block
(485,806 edges). Divided by the fastest step time that bench_throughput JSONs measured there
(--throughput), it gives the rate each model reaches on the GPU, beside the FP32 peak (--peak-tflops).

MACE (mace-torch with e3nn 0.4.4, as bench_throughput's peer) is counted in a subprocess with
--mace-site first on its path. e3nn's tensor products run as dense contractions with Clebsch–Gordan
blocks, so its count is what the e3nn backend computes, an upper bound on what cuEquivariance must.

    python -m benchmarks.step_flops --mace-site /tmp/site_mace \\
        --throughput benchmarks/results/throughput_{all_peers_10k,mace_cueq_large}_h100.json --out step_flops.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.bench_throughput import CUTOFF, ROOT, e2former_configs, fcc_carbon
from e2former_calc.neighbors import build_graph

COUNT_SIZES = (128, 384, 1000)
OURS = ("e2former_paper", "e2former_water_small")  # bench_throughput's architectures
TARGET = {"num_atoms": 10_000, "num_edges": 485_806}  # bench_throughput's 10k-atom block


class MatmulFlops(TorchDispatchMode):
    """Sums PyTorch's FLOP formulas over the operators that run inside it, backward ones included.

    FlopCounterMode itself also tracks modules with backward hooks, which autograd.grad (our forces)
    does not allow.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(step) -> int:
    """FLOPs of the matrix products in one call of `step`."""
    with MatmulFlops() as counter:
        step()
    return counter.flops


def count_model(model: str) -> list[dict]:
    """Counts of one conservative step of `model` (one of OURS, or "mace") at COUNT_SIZES."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    rows = []
    for n in COUNT_SIZES:
        graph = build_graph([fcc_carbon(n)], CUTOFF, device=device)
        if model == "mace":
            from benchmarks.bench_throughput import mace_contenders

            (contender,), _ = mace_contenders(device, 1.0, graph, cueq=False)
            step = contender.make_step(graph)
        else:
            from e2former_calc.models.e2former import E2FormerV2

            network = E2FormerV2(e2former_configs()[model]).eval()
            step = lambda: network(graph, compute_forces=True, mode="conservative")["forces"]  # noqa: E731
        rows.append({"num_atoms": graph.num_atoms, "num_edges": graph.num_edges, "flops": count_flops(step)})
        print(f"{model:16s} N={graph.num_atoms:6d} E={graph.num_edges:8d} {rows[-1]['flops'] / 1e9:10.2f} GFLOP",
              flush=True)
    return rows


def fit(rows: list[dict]) -> dict:
    """Least-squares a (FLOP per atom) and b (FLOP per edge) of flops ≈ a·N + b·E, and the worst misfit."""
    design = np.array([[r["num_atoms"], r["num_edges"]] for r in rows], dtype=float)
    flops = np.array([r["flops"] for r in rows], dtype=float)
    (per_atom, per_edge), *_ = np.linalg.lstsq(design, flops, rcond=None)
    misfit = np.max(np.abs(design @ [per_atom, per_edge] / flops - 1))
    predicted = per_atom * TARGET["num_atoms"] + per_edge * TARGET["num_edges"]
    return {"flop_per_atom": per_atom, "flop_per_edge": per_edge, "worst_relative_misfit": misfit,
            "gflop_at_10k": predicted / 1e9}


def fastest_seconds(paths: list[Path], model: str) -> float | None:
    """The shortest mean conservative step time at 10k atoms of `model` in bench_throughput JSONs, if it ran."""
    times = [row["seconds_per_step"] for path in paths for row in json.loads(path.read_text())["rows"]
             if (row["model"], row["mode"], row["num_atoms"], row["status"]) == (model, "conservative", 10_000, "ok")]
    return min(times, default=None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mace-site", help="folder with mace-torch and e3nn 0.4.4 installed (omit: ours only)")
    parser.add_argument("--throughput", type=Path, nargs="*", default=[],
                        help="bench_throughput JSONs with 10k-atom conservative step times")
    parser.add_argument("--peak-tflops", type=float, default=67.0,
                        help="the GPU's FP32 (non-tensor-core) peak, TFLOP/s (default: H100 SXM, 67)")
    parser.add_argument("--out", type=Path, default=Path("step_flops.json"))
    parser.add_argument("--count", choices=("mace",), help=argparse.SUPPRESS)  # in a subprocess
    args = parser.parse_args(argv)
    if args.count:
        args.out.write_text(json.dumps(count_model(args.count)))
        return

    counts = {model: count_model(model) for model in OURS}
    if args.mace_site:
        counts_file = args.out.with_suffix(".mace.json")
        environment = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
                       "PYTHONPATH": os.pathsep.join(filter(None, [args.mace_site, str(ROOT), os.environ.get("PYTHONPATH")]))}
        subprocess.run([sys.executable, "-m", "benchmarks.step_flops", "--count", "mace", "--out", str(counts_file)],
                       env=environment, cwd=ROOT, check=True)
        counts["mace"] = json.loads(counts_file.read_text())
        counts_file.unlink()

    result = {"what": "matrix-product FLOPs of one conservative step (benchmarks/step_flops.py)",
              "count_sizes": COUNT_SIZES, "target": TARGET, "peak_tflops": args.peak_tflops, "models": {}}
    print(f"\n{'model':16s} {'FLOP/atom':>12s} {'FLOP/edge':>12s} {'misfit':>7s} {'GFLOP@10k':>10s} "
          f"{'step ms':>8s} {'TFLOP/s':>8s} {'of peak':>8s}")
    timed = {**{model: [model] for model in OURS}, "mace": ["mace", "mace_cueq"]}
    for model, rows in counts.items():
        fitted = fit(rows)
        result["models"][model] = {"counts": rows, **fitted, "measured": {}}
        for timed_model in timed[model]:
            seconds = fastest_seconds(args.throughput, timed_model)
            rate = fitted["gflop_at_10k"] / 1e3 / seconds if seconds else None
            result["models"][model]["measured"][timed_model] = {"seconds_per_step": seconds, "tflops": rate}
            print(f"{timed_model:16s} {fitted['flop_per_atom']:12.4g} {fitted['flop_per_edge']:12.4g} "
                  f"{fitted['worst_relative_misfit']:7.1%} {fitted['gflop_at_10k']:10.1f} "
                  + (f"{seconds * 1e3:8.1f} {rate:8.2f} {rate / args.peak_tflops:8.1%}" if seconds else "   (not timed)"))
    result["throughput_files"] = [str(path) for path in args.throughput]
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
