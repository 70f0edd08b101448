"""Where the time of one model step goes (bench_throughput's protocol): device time per kernel, and per kind.

    python -m benchmarks.profile_step --out DIR            # GPU: paper size, 10k atoms, direct and conservative
    python -m benchmarks.profile_step --smoke --out /tmp   # CPU check of the script (water preset, 64 atoms)

One step is what bench_throughput times: the model on the FCC-carbon graph of --atoms atoms (cutoff
6 Å, random weights, seed 0), forces included; direct under no_grad, conservative through autograd
(F = -dE/dr, the attention kernels' backward included). After --warmup steps, --repeats steps run
under torch.profiler. Each kernel's self device time per step is listed, and summed per kind: our
attention kernels, matrix products, gathers and scatters (indexing), and everything else (elementwise,
reductions, copies). DIR/step_profile.json keeps the tables with the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from pathlib import Path

import torch

from benchmarks.bench_throughput import e2former_configs, fcc_carbon, neighbor_list_row
from benchmarks.common import environment, print_profile_rows, profile_device_time, synchronize
from e2former_calc.models.e2former import E2FormerV2

KINDS = {  # first match wins; names are CUDA kernel names on the GPU, aten op names on the CPU
    "attention kernels": r"_forward_kernel|_backward_\w*kernel|neighborattention",
    "matrix products": r"gemm|xmma|cutlass|cublas|aten::(mm|bmm|addmm|matmul|linear)\b",
    "gathers and scatters": r"index|scatter|gather",
}


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS.items() if re.search(pattern, lowered)), "other")


def profile_step(model: E2FormerV2, graph, mode: str, warmup: int, repeats: int) -> dict:
    """Per-kernel rows and per-kind sums (ms per step) of one direct or conservative step."""
    def step():
        with torch.no_grad() if mode == "direct" else contextlib.nullcontext():
            return model(graph, compute_forces=True, mode=mode)["forces"]

    for _ in range(warmup):
        step()
    synchronize()
    rows = profile_device_time(step, repeats, on_gpu=graph.positions.is_cuda)
    kinds: dict[str, float] = {}
    for row in rows:
        row["kind"] = kind_of(row["name"])
        kinds[row["kind"]] = kinds.get(row["kind"], 0.0) + row["ms"]
    return {"total_ms": sum(row["ms"] for row in rows), "kinds_ms": kinds, "kernels": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="directory for the JSON")
    parser.add_argument("--model", default="e2former_paper", choices=["e2former_paper", "e2former_water_small"])
    parser.add_argument("--atoms", type=int, default=10_000)
    parser.add_argument("--modes", nargs="+", default=["direct", "conservative"], choices=["direct", "conservative"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="water preset, 64 atoms, one profiled step")
    arguments = parser.parse_args(argv)
    if arguments.smoke:
        arguments.model, arguments.atoms, arguments.warmup, arguments.repeats = "e2former_water_small", 64, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graph, neighbor_row = neighbor_list_row(fcc_carbon(arguments.atoms), device)
    torch.manual_seed(0)
    model = E2FormerV2(e2former_configs()[arguments.model]).to(device).eval()
    results = {"environment": environment(), "model": arguments.model, "atoms": arguments.atoms,
               "edges": neighbor_row["num_edges"], "warmup": arguments.warmup, "repeats": arguments.repeats,
               "profiles": {}}
    for mode in arguments.modes:
        profile = profile_step(model, graph, mode, arguments.warmup, arguments.repeats)
        results["profiles"][mode] = profile
        total = profile["total_ms"]
        print(f"\n{arguments.model} {mode}, {arguments.atoms} atoms, {neighbor_row['num_edges']} edges: "
              f"{total:.2f} ms of device time per step")
        for kind, ms in sorted(profile["kinds_ms"].items(), key=lambda item: -item[1]):
            print(f"  {ms:9.2f} ms {100 * ms / total:5.1f}%  {kind}")
        print_profile_rows(profile["kernels"], total, limit=15)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_profile.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
