"""Where the time of one fused-attention forward + backward goes: device time per kernel and op.

    python -m benchmarks.profile_attention --out DIR          # GPU: N = 32768, K = 64, H = 16, D = 16, C = 64
    TRITON_INTERPRET=1 python -m benchmarks.profile_attention --smoke   # CPU check of the script

For each payload, after warm-up, --repeats forward + backward passes (gradients to all seven
inputs, as in bench_attention's fwd+bwd) run under torch.profiler; the table lists each kernel or
op by its total device time per pass (CUDA time on the GPU, CPU time on the CPU), and the JSON
(DIR/attention_profile.json) keeps the table with the environment.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from benchmarks.bench_attention import build_case, make_problem
from benchmarks.common import environment, print_profile_rows, profile_device_time, synchronize


def profile_pass(design: str, problem: dict, warmup: int, repeats: int) -> list[dict]:
    """[{name, calls, ms}] per pass of `design`'s forward + backward, largest first."""
    forward, inputs, _ = build_case(design, problem)
    for tensor in inputs:
        tensor.requires_grad_(True)

    def one_pass():
        out = forward()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    for _ in range(warmup):
        one_pass()
    synchronize()
    rows = profile_device_time(one_pass, repeats, on_gpu=problem["query"].is_cuda)
    for tensor in inputs:
        tensor.requires_grad_(False)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="directory for the JSON")
    parser.add_argument("--nodes", type=int, default=32768)
    parser.add_argument("--neighbours", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one profiled pass (CPU check)")
    arguments = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nodes, neighbours, shape = (arguments.nodes, arguments.neighbours, (16, 16, 64))
    if arguments.smoke:
        nodes, neighbours, shape = 24, 4, (2, 4, 8)
    repeats = 1 if arguments.smoke else arguments.repeats
    problem = make_problem(nodes, neighbours, device, shape=shape)
    results = {"environment": environment(), "N": nodes, "K": neighbours, "H, D, C": list(shape), "repeats": repeats,
               "profiles": {}}
    for design in ("ours_inv", "ours_dir"):
        rows = profile_pass(design, problem, warmup=0 if arguments.smoke else 5, repeats=repeats)
        results["profiles"][design] = rows
        total = sum(row["ms"] for row in rows)
        print(f"\n{design}: forward + backward, N = {nodes}, K = {neighbours}: {total:.3f} ms of device time per pass")
        print_profile_rows(rows, total, limit=12)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_profile.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
