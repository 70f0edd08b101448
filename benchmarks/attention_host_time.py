"""Host time of the fused attention at small N: what each piece of a call costs the CPU.

    python -m benchmarks.attention_host_time --out DIR                  # GPU: N = 128, K = 64
    TRITON_INTERPRET=1 python -m benchmarks.attention_host_time --smoke   # CPU check of the script

At N = 128 the GPU work of a forward + backward is ~0.1 ms (bench_attention's "graphs" section),
so an eager call's latency is the host's: Python, autograd and one launch per kernel. Each piece
below runs `--repeats` times back to back with one synchronisation at the end; its wall time per
call is the host's cost whenever the GPU keeps up (its work here is far below the host's). The
pieces are the ones `NeighborAttentionFunction` runs, timed on their own, plus SDPA with the same
autograd call for comparison. DIR/attention_host_time.json keeps the table with the environment.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

import torch

from benchmarks.bench_attention import CUTOFF, OUR_INPUTS, build_case, make_problem
from benchmarks.common import environment, synchronize
from e2former_calc.kernels import neighbor_attention as attention


def host_microseconds(function, repeats: int) -> float:
    """Mean wall time per call in µs of `repeats` back-to-back calls (after 3 warm-ups)."""
    for _ in range(3):
        function()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize()
    return 1e6 * (time.perf_counter() - start) / repeats


def python_profile(function, repeats: int, lines: int) -> str:
    """cProfile's table of `repeats` calls, the `lines` functions of largest own time first."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [function() for _ in range(repeats)])
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()


def pieces(problem: dict, payload: str) -> dict:
    """{name: callable} of the parts of one forward + backward of our op."""
    design = {"inverse_distance": "ours_inv", "direction": "ours_dir"}[payload]
    forward, inputs, _ = build_case(design, problem)

    def pack():  # what NeighborAttentionFunction.forward does first (default sink, as in bench_attention)
        return attention.attention_inputs(*(problem[n] for n in OUR_INPUTS), problem["row_ptr"],
                                          problem["source_index"], CUTOFF, payload, 1e-3)

    packed = pack()
    transpose = attention.transpose_neighbors(problem["row_ptr"], problem["source_index"])
    out, lse = attention.launch_forward(packed)
    grad_out = torch.ones_like(out)
    _, d_bias, _, d_edge_vector_per_head = attention.launch_backward_edges(packed, transpose, out, lse, grad_out)

    def forward_backward():
        # Only this piece needs the inputs to require grad; setting and clearing it costs ~5 µs per call.
        for tensor in inputs:
            tensor.requires_grad_(True)
        try:
            torch.autograd.grad(forward(), inputs, grad_out)
        finally:
            for tensor in inputs:
                tensor.requires_grad_(False)

    return {
        "forward (no grad)": forward,
        "forward + backward (autograd.grad, 7 inputs)": forward_backward,
        "  attention_inputs (pack)": pack,
        "  launch_forward": lambda: attention.launch_forward(packed),
        "  launch_backward_edges (with delta)": lambda: attention.launch_backward_edges(
            packed, transpose, out, lse, grad_out),
        "  launch_backward_target": lambda: attention.launch_backward_target(packed, d_bias),
        "  launch_backward_source": lambda: attention.launch_backward_source(packed, transpose, lse, grad_out, d_bias),
        "  delta = (grad_out * out).sum((1, 3))": lambda: (grad_out * out).sum(dim=(1, 3)),
        "  head sum of d edge_vector": lambda: d_edge_vector_per_head.sum(1),
        "  launch_config lookup": lambda: packed.launch_config("source"),
        "  torch.empty_like": lambda: torch.empty_like(packed.query),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="directory for the JSON")
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--neighbours", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--cprofile", type=int, default=15,
                        help="print this many functions of a cProfile of the direction's forward + backward (0: none)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats (CPU check)")
    arguments = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nodes, neighbours, shape, repeats = arguments.nodes, arguments.neighbours, (16, 16, 64), arguments.repeats
    if arguments.smoke:
        nodes, neighbours, shape, repeats = 8, 4, (2, 4, 8), 2
    problem = make_problem(nodes, neighbours, device, shape=shape)
    results = {"environment": environment(), "N": nodes, "K": neighbours, "H, D, C": list(shape), "repeats": repeats,
               "microseconds": {}}

    sdpa_forward, sdpa_inputs, _ = build_case("sdpa", problem)
    for tensor in sdpa_inputs:
        tensor.requires_grad_(True)
    sdpa_out = sdpa_forward()
    sdpa_grad = torch.ones_like(sdpa_out)
    table = {"sdpa: forward + backward (autograd.grad, 3 inputs)":
             lambda: torch.autograd.grad(sdpa_forward(), sdpa_inputs, sdpa_grad)}
    table_time = {name: host_microseconds(function, repeats) for name, function in table.items()}
    for tensor in sdpa_inputs:
        tensor.requires_grad_(False)
    for payload in ("inverse_distance", "direction"):
        table_time |= {f"{payload}: {name}": host_microseconds(function, repeats)
                       for name, function in pieces(problem, payload).items()}
    print(f"host µs per call, N = {nodes}, K = {neighbours}, H, D, C = {shape}, {repeats} calls back to back")
    for name, microseconds in table_time.items():
        print(f"{microseconds:10.1f}  {name}")
    results["microseconds"] = table_time
    if arguments.cprofile:
        results["cprofile"] = python_profile(pieces(problem, "direction")["forward + backward (autograd.grad, 7 inputs)"],
                                             repeats, arguments.cprofile)
        print(results["cprofile"])
    out = Path(arguments.out) / "attention_host_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
