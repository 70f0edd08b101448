"""Arithmetic and memory traffic of one energy + forces step, ours beside MACE, against measured step times.

One conservative step (forward and force backward) runs on the CPU, where our attention runs its
PyTorch reference, and StepWork counts (i) the FLOPs of its matrix products with PyTorch's formulas
(torch.utils.flop_counter.flop_registry: mm, bmm, addmm, the products inside einsum; elementwise
work is not counted) and (ii) for ours, the bytes every non-view operator reads and writes (the
traffic of an unfused execution) outside the attention, to which the least the fused attention
kernel must move is added (attention_work). Ours: the paper size and the water preset at 6 Å
(bench_throughput's e2former_configs). Counted on FCC carbon blocks of three sizes
(bench_throughput's protocol: 6 Å cutoff, no pbc), each quantity is fitted as a·N + b·E (N atoms,
E edges) and extrapolated to the 10k-atom block (485,806 edges). Divided by the fastest step time
bench_throughput JSONs measured there (--throughput), the FLOPs give the rate each model reaches on
the GPU, beside its FP32 peak (--peak-tflops); the bytes over --bandwidth give the time an unfused
step needs for its traffic alone.

MACE (mace-torch with e3nn 0.4.4, as bench_throughput's peer) is counted (FLOPs only) in a
subprocess with --mace-site first on its path. e3nn's tensor products run as dense contractions
with Clebsch–Gordan blocks, so its count is what the e3nn backend computes, an upper bound on what
cuEquivariance must.

    python -m benchmarks.step_flops --mace-site /tmp/site_mace \\
        --throughput benchmarks/results/throughput_{all_peers_10k,mace_cueq_large}_h100.json --out step_flops.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.bench_throughput import CUTOFF, ROOT, attention_replaced, e2former_configs, fcc_carbon, mace_contenders
from e2former_calc.kernels.neighbor_attention import neighbor_attention
from e2former_calc.models.e2former import E2FormerV2
from e2former_calc.neighbors import build_graph

COUNT_SIZES = (128, 384, 1000)
OURS = ("e2former_paper", "e2former_water_small")  # bench_throughput's architectures
TARGET = {"num_atoms": 10_000, "num_edges": 485_806}  # bench_throughput's 10k-atom block


class StepWork(TorchDispatchMode):
    """Over the operators that run inside it, backward ones included: the FLOPs of PyTorch's formulas
    (matrix products) and the bytes of every operator's tensor operands and results, views (aliases) excepted
    (what an unfused execution reads and writes, each operator going through memory).

    FlopCounterMode itself also tracks modules with backward hooks, which autograd.grad (our forces)
    does not allow.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        if not func.is_view and func._overloadpacket is not torch.ops.aten._unsafe_view:  # an alias too
            self.bytes += sum(tensor_bytes(x) for x in torch.utils._pytree.tree_leaves((args, kwargs, out)))
        return out


def tensor_bytes(x) -> int:
    """Bytes of the elements of `x` if it is a tensor, else 0."""
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


@contextlib.contextmanager
def recorded_attention_calls():
    """Yields a list that collects the (args, kwargs) of each neighbour-attention call of E2FormerV2."""
    calls = []

    def recording(attention):
        def record(*args, **kwargs):
            calls.append((args, kwargs))
            return attention(*args, **kwargs)
        return record

    with attention_replaced(recording):
        yield calls


def attention_work(calls) -> dict:
    """Work of the recorded attention calls: what the PyTorch reference moves (forward and all input
    gradients, run again on its own) and the least the fused kernel must: each call's tensor inputs
    and output (plus a [N, H] log-sum-exp) in the forward; the inputs, output, log-sum-exp, output
    gradient and the float inputs' gradients in the backward."""
    reference = StepWork()
    minimum = 0
    for args, kwargs in calls:
        leaves = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args]
        float_inputs = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
        with reference:
            out = neighbor_attention(*leaves, **{**kwargs, "use_kernel": False})
            torch.autograd.grad(out, float_inputs, torch.ones_like(out))
        inputs = sum(tensor_bytes(a) for a in leaves)
        lse = args[0].shape[0] * args[0].shape[1] * out.element_size()
        minimum += (inputs + tensor_bytes(out) + lse) + (inputs + 2 * tensor_bytes(out) + lse
                                                         + sum(tensor_bytes(a) for a in float_inputs))
    return {"attention_reference_bytes": reference.bytes, "attention_minimum_bytes": minimum}


def count_model(model: str) -> list[dict]:
    """Counts of one conservative step of `model` (one of OURS, or "mace") at COUNT_SIZES: FLOPs, and
    for ours the bytes outside the attention and the attention's minimum bytes (see attention_work)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    rows = []
    for n in COUNT_SIZES:
        graph = build_graph([fcc_carbon(n)], CUTOFF, device=device)
        work = StepWork()
        if model == "mace":
            (contender,), _ = mace_contenders(device, 1.0, graph, cueq=False)
            with work:
                contender.make_step(graph)()
            row = {"flops": work.flops}
        else:
            network = E2FormerV2(e2former_configs()[model]).eval()
            network(graph, compute_forces=True, mode="conservative")  # the graph's cached index structures
            with recorded_attention_calls() as calls, work:
                network(graph, compute_forces=True, mode="conservative")
            attention = attention_work(calls)
            row = {"flops": work.flops, "bytes_outside_attention": work.bytes - attention["attention_reference_bytes"],
                   "attention_minimum_bytes": attention["attention_minimum_bytes"]}
        rows.append({"num_atoms": graph.num_atoms, "num_edges": graph.num_edges, **row})
        print(f"{model:20s} N={graph.num_atoms:6d} E={graph.num_edges:8d} {row['flops'] / 1e9:9.2f} GFLOP"
              + (f" {row['bytes_outside_attention'] / 1e9:8.2f} GB outside attention" if "bytes_outside_attention" in row
                 else ""), flush=True)
    return rows


def fit(rows: list[dict], quantity: str) -> dict:
    """Least-squares per-atom and per-edge parts of `quantity` ≈ a·N + b·E, the worst relative
    misfit, and the prediction at TARGET."""
    design = np.array([[r["num_atoms"], r["num_edges"]] for r in rows], dtype=float)
    values = np.array([r[quantity] for r in rows], dtype=float)
    (per_atom, per_edge), *_ = np.linalg.lstsq(design, values, rcond=None)
    misfit = np.max(np.abs(design @ [per_atom, per_edge] / values - 1))
    return {"per_atom": per_atom, "per_edge": per_edge, "worst_relative_misfit": misfit,
            "at_10k": per_atom * TARGET["num_atoms"] + per_edge * TARGET["num_edges"]}


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
    parser.add_argument("--bandwidth", type=float, default=3.35,
                        help="the GPU's memory bandwidth, TB/s (default: H100 SXM, 3.35)")
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

    result = {"what": "matrix-product FLOPs and unfused bytes of one conservative step (benchmarks/step_flops.py)",
              "count_sizes": COUNT_SIZES, "target": TARGET, "peak_tflops": args.peak_tflops,
              "bandwidth_tb_per_s": args.bandwidth, "models": {}}
    print(f"\n{'model':20s} {'MFLOP/atom':>10s} {'kFLOP/edge':>10s} {'GFLOP@10k':>10s} {'step ms':>8s} {'TFLOP/s':>8s} "
          f"{'of peak':>8s} {'GB@10k':>16s} {'ms at bandwidth':>16s}")
    timed = {**{model: [model] for model in OURS}, "mace": ["mace", "mace_cueq"]}
    for model, rows in counts.items():
        fitted = {quantity: fit(rows, quantity) for quantity in rows[0] if quantity not in ("num_atoms", "num_edges")}
        result["models"][model] = {"counts": rows, "fits": fitted, "measured": {}}
        flops = fitted["flops"]
        traffic = ""
        if "bytes_outside_attention" in fitted:  # ours: unfused bytes outside the attention + the kernel's minimum
            outside, attention = fitted["bytes_outside_attention"]["at_10k"], fitted["attention_minimum_bytes"]["at_10k"]
            traffic = f"{outside / 1e9:7.1f} + {attention / 1e9:6.1f} {(outside + attention) / args.bandwidth / 1e9:16.1f}"
        for timed_model in timed[model]:
            seconds = fastest_seconds(args.throughput, timed_model)
            rate = flops["at_10k"] / 1e12 / seconds if seconds else None
            result["models"][model]["measured"][timed_model] = {"seconds_per_step": seconds, "tflops": rate}
            measured = f"{seconds * 1e3:8.1f} {rate:8.2f} {rate / args.peak_tflops:8.1%}" if seconds else f"{'-':>8s} " * 3
            print(f"{timed_model:20s} {flops['per_atom'] / 1e6:10.2f} {flops['per_edge'] / 1e3:10.1f} "
                  f"{flops['at_10k'] / 1e9:10.1f} {measured} {traffic}")
    result["throughput_files"] = [str(path) for path in args.throughput]
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
