"""Launch configurations of the neighbour-attention kernels: which compile for sm_90, which agree
with the reference, and which are fastest.

    python -m benchmarks.kernel_configs --compile-only --out DIR   # any machine, no GPU: sm_90 registers/spills
    python -m benchmarks.kernel_configs --out DIR                  # GPU: correctness + timing, ~5 min
    TRITON_INTERPRET=1 python -m benchmarks.kernel_configs --smoke # CPU check of the GPU sweep's code path

A configuration is (rows, warps, edges): BLOCK_R consecutive (atom, head) rows per program,
num_warps, and neighbour steps unrolled per loop iteration (``LaunchConfig``). Each kernel (forward, edge, target-side and source-side backward)
is swept on its own through the E2FORMER_ATTENTION_CONFIG override (``kernel=ROWSxWARPS[xEDGES]``),
the others keeping their defaults.

--compile-only compiles every configuration for sm_90 on the CPU (Triton's own ptxas) and
reports registers and spill bytes per thread, or the compiler error: Triton 3.6 crashed in its
layout passes on some tile shapes. The GPU sweep first checks each configuration against the
PyTorch reference on a small ragged graph (output and all 7 gradients), then times the kernel
alone (CUDA events) on a benchmark-sized problem. A configuration that fails to compile, fails
the check or runs out of memory is recorded as such and skipped. Both write JSON to
DIR/kernel_configs[_compile].json (DIR defaults to $OUT, else benchmarks/results) and print
the best configuration per (shape, kernel) as a DEFAULT_CONFIGS entry and an override string.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile
import time
from unittest import mock

import torch
import triton

import e2former_calc.kernels.neighbor_attention as attention
from benchmarks.bench_attention import CUTOFF, OUR_INPUTS, make_problem, ragged_problem
from benchmarks.common import environment, guarded, time_calls

# (name, H, D, V, payload, N, K): the benchmark's shape with both payloads, and the model's
# moments path (direction) for the water_small preset and the paper's default heads. The small ones
# (bench_small; water_md, the 648 atoms of the 216-water MD box with ~50 neighbours within 5 Å)
# launch fewer programs than an H100/H200 has SMs: there the serial neighbour loop's latency, not
# bandwidth, sets the time, and unrolling it may pay where it does not at N = 32768.
SHAPES = [
    ("bench", 16, 16, 64, "inverse_distance", 32768, 64),
    ("bench", 16, 16, 64, "direction", 32768, 64),
    ("water_small", 16, 8, 36, "direction", 32768, 32),
    ("paper", 128, 8, 18, "direction", 8192, 32),
    ("bench_small", 16, 16, 64, "inverse_distance", 512, 64),
    ("bench_small", 16, 16, 64, "direction", 512, 64),
    ("water_md", 16, 8, 36, "direction", 648, 48),
]
SMOKE_SHAPES = [("smoke", 3, 4, 5, "inverse_distance", 24, 5), ("smoke", 3, 4, 5, "direction", 24, 5)]
ROWS, WARPS, EDGES_PER_STEP = (16, 32, 64, 128), (2, 4, 8), (1, 2, 4)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
KERNEL_FUNCTIONS = {"forward": "_forward_kernel", "edge": "_backward_edge_kernel", "target": "_backward_target_kernel",
                    "source": "_backward_source_kernel"}


def sweep_points(names, payload, value_dim, dtype):
    """(kernel, LaunchConfig) pairs to sweep: ``ROWSxWARPS[xEDGES]`` names and "default" (the table's
    choice for this shape), or without names the full grid ROWS x WARPS x EDGES_PER_STEP."""
    block_v = triton.next_power_of_2(value_dim)
    for kernel in attention.KERNELS:
        default = attention._default_config(kernel, payload, block_v, torch.finfo(dtype).bits // 8)
        grid = [attention.LaunchConfig(*knobs) for knobs in itertools.product(ROWS, WARPS, EDGES_PER_STEP)]
        for config in grid if not names else [
                default if name == "default" else attention.LaunchConfig(*map(int, name.split("x"))) for name in names]:
            yield kernel, config


def config_name(config):
    """ROWSxWARPS, with xEDGES when more than one neighbour step is unrolled."""
    return "x".join(map(str, config if config.edges_per_step > 1 else config[:2]))


def override(kernel, config):
    return f"{kernel}={config_name(config)}"


# ----------------------------------------------------------------------------- compile for sm_90 (no GPU)


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **meta)`` records (args, meta)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((args, meta))


def recorded_launches(inputs, payload_transpose):
    """{kernel: (args, meta)} of the four launches for these inputs, with nothing run."""
    recorders = {kernel: _LaunchRecorder() for kernel in attention.KERNELS}
    patches = [mock.patch.object(attention, KERNEL_FUNCTIONS[k], recorders[k]) for k in attention.KERNELS]
    for patch in patches:
        patch.start()
    try:
        out, lse = attention.launch_forward(inputs)
        d_bias = attention.launch_backward_edges(inputs, payload_transpose, out, lse, out)[1]
        attention.launch_backward_target(inputs, d_bias)
        attention.launch_backward_source(inputs, payload_transpose, lse, out, d_bias)
    finally:
        for patch in patches:
            patch.stop()
    return {kernel: recorder.calls[0] for kernel, recorder in recorders.items()}


def compile_for_sm90(kernel, args, meta):
    """Compile one launch for sm_90 exactly as the launcher would specialise it; registers and
    spill bytes per thread from ptxas -v. Uses Triton 3.6 internals (binder, _pack_args)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    function = getattr(attention, KERNEL_FUNCTIONS[kernel])
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(function.signature, function.params, backend)
    meta = dict(meta, debug=False)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = function._pack_args(backend, meta, bound, specialization, options)
    compiled = triton.compile(ASTSource(function, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(compiled.asm["ptx"])
    try:
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", handle.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(handle.name)
    return dict(registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill_bytes=int(re.search(r"(\d+) bytes spill stores", log).group(1)))


def compile_sweep(shapes, dtypes, names):
    records = []
    for (name, heads, head_dim, value_dim, payload, _, _), dtype in itertools.product(shapes, dtypes):
        problem = ragged_problem(20, 4, torch.device("cpu"), dtype, (heads, head_dim, value_dim))
        inputs = attention.attention_inputs(*(problem[n] for n in OUR_INPUTS), problem["row_ptr"],
                                            problem["source_index"], CUTOFF, payload, 1e-3)
        transpose = attention.transpose_neighbors(problem["row_ptr"], problem["source_index"])
        for kernel, config in sweep_points(names, payload, value_dim, dtype):
            with mock.patch.dict(os.environ, {attention.CONFIG_ENV: override(kernel, config)}):
                args, meta = recorded_launches(inputs, transpose)[kernel]
            start = time.perf_counter()
            result, status = guarded(lambda: compile_for_sm90(kernel, args, meta))
            record = dict(shape=name, H=heads, D=head_dim, V=value_dim, payload=payload, dtype=str(dtype).split(".")[-1],
                          kernel=kernel, rows=config.block_rows, warps=config.num_warps, edges=config.edges_per_step, status=status,
                          compile_s=time.perf_counter() - start, **(result or {}))
            records.append(record)
            detail = f"{record['registers']:3d} registers, {record['spill_bytes']:5d} B spilled" if result else status
            print(f"{name:<12} {payload:<16} {record['dtype']:<7} {kernel:<7} {config_name(config):>7}: "
                  f"{detail}", flush=True)
    return records


# ----------------------------------------------------------------------------- GPU (or interpreter) sweep


def max_relative_error(problem, payload, dtype):
    """Max over output and the 7 gradients of |kernel - reference| / max |reference|."""
    outputs = []
    for use_kernel in (False, True):
        inputs = {n: problem[n].clone().requires_grad_() for n in OUR_INPUTS}
        out = attention.neighbor_attention(*inputs.values(), problem["row_ptr"], problem["source_index"], CUTOFF,
                                           payload=payload, use_kernel=use_kernel)
        grad_out = torch.sin(torch.arange(out.numel(), device=out.device, dtype=dtype)).reshape(out.shape)
        outputs.append([out.detach(), *torch.autograd.grad(out, list(inputs.values()), grad_out)])
    return max(float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)) for want, got in zip(*outputs))


def kernel_calls(problem, payload):
    """{kernel: callable running that kernel alone} on a problem (forward outputs precomputed)."""
    inputs = attention.attention_inputs(*(problem[n] for n in OUR_INPUTS), problem["row_ptr"], problem["source_index"],
                                        CUTOFF, payload, 1e-3)
    out, lse = attention.launch_forward(inputs)
    grad_out = torch.randn_like(out)
    transpose = attention.transpose_neighbors(problem["row_ptr"], problem["source_index"])
    d_bias = attention.launch_backward_edges(inputs, transpose, out, lse, grad_out)[1]
    return {
        "forward": lambda: attention.launch_forward(inputs),
        "edge": lambda: attention.launch_backward_edges(inputs, transpose, out, lse, grad_out),
        "target": lambda: attention.launch_backward_target(inputs, d_bias),
        "source": lambda: attention.launch_backward_source(inputs, transpose, lse, grad_out, d_bias),
    }


def timing_sweep(shapes, dtypes, names, smoke, budget_s, device):
    records, started = [], time.perf_counter()
    warmup, repeats = (0, 1) if smoke else (5, 20)
    for (name, heads, head_dim, value_dim, payload, num_nodes, neighbours), dtype in itertools.product(shapes, dtypes):
        shape = (heads, head_dim, value_dim)
        check_problem = ragged_problem(24 if smoke else 300, 5 if smoke else 40, device, dtype, shape)
        problem, status = guarded(lambda: make_problem(num_nodes, neighbours, device, dtype=dtype, shape=shape))
        calls, status = guarded(lambda: kernel_calls(problem, payload)) if problem else (None, status)
        for kernel, config in sweep_points(names, payload, value_dim, dtype):
            record = dict(shape=name, H=heads, D=head_dim, V=value_dim, payload=payload, N=num_nodes, K=neighbours,
                          dtype=str(dtype).split(".")[-1], kernel=kernel, rows=config.block_rows, warps=config.num_warps,
                          edges=config.edges_per_step)
            if time.perf_counter() - started > budget_s:
                records.append(dict(record, status="skipped: time budget"))
                continue
            with mock.patch.dict(os.environ, {attention.CONFIG_ENV: override(kernel, config)}):
                error, check_status = guarded(lambda: max_relative_error(check_problem, payload, dtype))
                if error is None:
                    record["status"] = check_status
                elif not error < TOLERANCE[dtype]:
                    record.update(status="wrong", max_relative_error=error)
                elif calls is None:
                    record.update(status=f"problem: {status}", max_relative_error=error)
                else:
                    timing, time_status = guarded(lambda: time_calls(calls[kernel], warmup, repeats))
                    record.update(status=time_status, max_relative_error=error, **(timing or {}))
            records.append(record)
            detail = f"{record['mean_ms']:9.3f} ms (err {record['max_relative_error']:.0e})" if "mean_ms" in record else record["status"]
            print(f"{name:<12} {payload:<16} {record['dtype']:<7} {kernel:<7} {config_name(config):>7}: "
                  f"{detail}", flush=True)
        problem = calls = None  # free the GPU memory before the next shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def best_configs(records):
    """{(shape, payload, dtype, kernel): fastest ok record}."""
    best = {}
    for r in records:
        if r.get("status") == "ok" and "mean_ms" in r:
            key = (r["shape"], r["payload"], r["dtype"], r["kernel"])
            if key not in best or r["mean_ms"] < best[key]["mean_ms"]:
                best[key] = r
    return best


def print_best(best):
    print("\nfastest configuration per (shape, payload, dtype, kernel):")
    for (shape, payload, dtype, kernel), r in sorted(best.items()):
        print(f"  {shape:<12} {payload:<16} {dtype:<7} {kernel:<7} LaunchConfig({r['rows']}, {r['warps']}, {r['edges']})"
              f"  {r['mean_ms']:.3f} ms")
    for (shape, payload, dtype), group in itertools.groupby(sorted(best), key=lambda key: key[:3]):
        setting = ",".join(override(key[3], attention.LaunchConfig(best[key]["rows"], best[key]["warps"], best[key]["edges"]))
                           for key in group)
        print(f"  {attention.CONFIG_ENV}={setting}   # {shape} {payload} {dtype}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="directory for the JSON")
    parser.add_argument("--compile-only", action="store_true", help="compile for sm_90 on this machine, run nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; configurations 16x4 and 32x2 unless --configs")
    parser.add_argument("--configs", nargs="*", default=None,
                        help="ROWSxWARPS[xEDGES] names and/or 'default' (default: rows 16..128 x warps 2, 4, 8 x edges 1, 2, 4)")
    parser.add_argument("--shapes", nargs="*", default=None, help="shape names to sweep (default: all)")
    parser.add_argument("--dtypes", nargs="*", default=["float32"], choices=["float32", "float64"])
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new configuration after this")
    args = parser.parse_args()
    shapes = SMOKE_SHAPES if args.smoke else [s for s in SHAPES if args.shapes is None or s[0] in args.shapes]
    dtypes = [getattr(torch, name) for name in args.dtypes]
    names = args.configs or (["16x4", "32x2"] if args.smoke else None)
    started = time.perf_counter()
    report = dict(environment(), compile_only=args.compile_only)
    if args.compile_only:
        report["results"] = compile_sweep(shapes, dtypes, names)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        report["results"] = timing_sweep(shapes, dtypes, names, args.smoke, args.budget_s, device)
        print_best(best_configs(report["results"]))
    report["wall_s"] = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernel_configs_compile.json" if args.compile_only else "kernel_configs.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {path} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
