"""EAAS tensor product versus dense ones on the same shapes (paper Fig. 3 protocol).

x [N, (L+1)^2, C] ⊗ ℛ^lf(r) [N, 2lf+1] -> all paths l1 ⊗ lf -> l3 <= L, for N products, with
  eaas   our EAAS product (frame + rotate, re-index, rotate back; structured backward),
  dense  our plain CG einsum (`dense_tensor_product`),
  e3nn   e3nn.o3.TensorProduct, 'uvu' paths without weights (x in e3nn's own layout).
Each does the solid harmonics of r itself. Forward and forward+backward (gradients to x and r)
are timed after warm-up calls (CUDA events on GPU); on GPU the peak memory above the inputs is
recorded (torch.cuda.max_memory_allocated). Out-of-memory is recorded as "OOM".

    python -m benchmarks.bench_eaas --sizes 1000 10000 100000 1000000 --out eaas.json
"""

from __future__ import annotations

import argparse
import json

import torch
from e3nn import o3

from benchmarks.common import environment, time_cuda
from e2former_calc.models.eaas import dense_tensor_product, eaas_tensor_product, tensor_product_paths

METHODS = ("eaas", "dense", "e3nn")


def e3nn_product(l: int, l_filter: int, channels: int, device, dtype):
    """e3nn's dense product for the same paths; takes x as [N, sum_l C (2l+1)] and r as [N, 3]."""
    parity = lambda degree: 1 if degree % 2 == 0 else -1  # noqa: E731  ℛ^l has parity (-1)^l
    paths = tensor_product_paths(l, l_filter, l)
    tp = o3.TensorProduct(
        o3.Irreps([(channels, (degree, parity(degree))) for degree in range(l + 1)]),
        o3.Irreps([(1, (l_filter, parity(l_filter)))]),
        o3.Irreps([(channels, (p.l3, parity(p.l1 + l_filter))) for p in paths]),
        [(p.l1, 0, k, "uvu", False) for k, p in enumerate(paths)],
        irrep_normalization="none",
        path_normalization="none",
    ).to(device=device, dtype=dtype)
    return lambda x, r: tp(x, o3.spherical_harmonics(l_filter, r, normalize=False, normalization="component"))


def measure(function, inputs, grad_output, warmup, repeats, device) -> dict:
    """Forward and forward+backward seconds per call, and peak extra GPU memory (MiB)."""

    def forward():
        with torch.no_grad():
            function(*inputs)

    def forward_backward():
        function(*inputs).backward(grad_output)

    result = {}
    for name, step in (("forward_s", forward), ("forward_backward_s", forward_backward)):
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                baseline = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            result[name] = time_cuda(step, warmup, repeats)
            if device.type == "cuda":
                key = name.replace("_s", "_peak_mib")
                result[key] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        except torch.cuda.OutOfMemoryError:
            result[name] = "OOM"
        for tensor in inputs:
            tensor.grad = None
    return result


def run_size(n, args, device, dtype) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(n)
    rows, channels = (args.l + 1) ** 2, args.channels
    x = torch.randn(n, rows, channels, device=device, dtype=dtype, generator=generator, requires_grad=True)
    r = torch.randn(n, 3, device=device, dtype=dtype, generator=generator, requires_grad=True)
    # e3nn's layout: per degree, channel-major [N, C * (2l+1)]
    x_e3nn = torch.cat([x[:, l * l : (l + 1) ** 2].transpose(1, 2).flatten(1) for l in range(args.l + 1)], 1)
    x_e3nn = x_e3nn.detach().contiguous().requires_grad_()
    out_rows = tensor_product_paths(args.l, args.l_filter, args.l)[-1].rows.stop
    grad_output = torch.randn(n, out_rows, channels, device=device, dtype=dtype, generator=generator)

    cases = {
        "eaas": (lambda a, b: eaas_tensor_product(a, b, args.l, args.l_filter, args.l), (x, r), grad_output),
        "dense": (lambda a, b: dense_tensor_product(a, b, args.l, args.l_filter, args.l), (x, r), grad_output),
        "e3nn": (e3nn_product(args.l, args.l_filter, channels, device, dtype), (x_e3nn, r), grad_output.flatten(1)),
    }
    records = []
    for method in args.methods:
        function, inputs, grad = cases[method]
        record = {"n": n, "method": method}
        record.update(measure(function, inputs, grad, args.warmup, args.repeats, device))
        records.append(record)
        print(format_row(record), flush=True)
    return records


def format_row(record) -> str:
    ms = lambda v: f"{v * 1e3:11.3f}" if isinstance(v, float) else f"{v:>11}"  # noqa: E731
    mib = lambda v: f"{v:10.1f}" if isinstance(v, float) else f"{'-':>10}"  # noqa: E731
    return (
        f"{record['n']:>9} {record['method']:>6} {ms(record['forward_s'])} {ms(record['forward_backward_s'])}"
        f" {mib(record.get('forward_peak_mib'))} {mib(record.get('forward_backward_peak_mib'))}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", help="numbers of products (default 1e3..1e5 CPU, ..1e6 GPU)")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--l", type=int, default=2, help="degree of inputs and outputs")
    parser.add_argument("--l-filter", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10 GPU, 2 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20 GPU, 3 CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    sizes = [int(s) for s in (args.sizes or ([1e3, 1e4, 1e5, 1e6] if on_gpu else [1e3, 1e4, 1e5]))]
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    args.repeats = args.repeats if args.repeats is not None else (20 if on_gpu else 3)

    print(f"# L={args.l} lf={args.l_filter} C={args.channels} {args.dtype} on {environment()['device']}, {torch.get_num_threads()} threads")
    print(f"{'N':>9} {'method':>6} {'fwd ms':>11} {'fwd+bwd ms':>11} {'fwd MiB':>10} {'f+b MiB':>10}")
    records = [record for n in sizes for record in run_size(n, args, device, dtype)]

    speedups = {}
    for n in sizes:
        by_method = {r["method"]: r for r in records if r["n"] == n}
        if "eaas" in by_method and "e3nn" in by_method:
            speedups[n] = {
                key: by_method["e3nn"][key] / by_method["eaas"][key]
                for key in ("forward_s", "forward_backward_s")
                if isinstance(by_method["e3nn"][key], float) and isinstance(by_method["eaas"][key], float)
            }
            print(f"# N={n}: e3nn / eaas time = " + ", ".join(f"{k[:-2]} {v:.2f}x" for k, v in speedups[n].items()))

    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"} | {"torch_threads": torch.get_num_threads()}
        report = {"environment": environment(), "settings": settings, "results": records, "speedup_vs_e3nn": speedups}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
