"""Latency, throughput and memory of sparse neighbour attention designs (paper appendix A protocol).

    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100.json   # GPU, < 6 min
    python benchmarks/bench_attention.py --large ...   # also ours at N up to 2^20
    python benchmarks/bench_attention.py --quick        # tiny CPU run of the script itself

Every target attends to K random sources (distinct for N <= 32768). fp32, H = 16 heads, D = 16
query/key width per head, C = 64 value channels per head; 10 warm-ups and 50 timed runs with
CUDA events (fewer, and recorded, when one call takes over 0.5 s). Designs, side by side:

  naive      PyTorch gather: materialises N x K x H x D keys and N x K x H x C values, softmax, sum.
  sdpa       torch scaled_dot_product_attention with a dense N x N boolean neighbour mask
             (mask built once, not timed; "OOM" once it does not fit).
  split      the public reference code's design: a Triton q.k kernel writing N x K x H logits,
             PyTorch softmax on them, a Triton weighted-sum kernel (forward only: it has no backward).
  torch_ref  our op in plain PyTorch (kernels/neighbor_attention_reference.py), small N only.
  ours_inv   our fused kernel, payload "inverse_distance" (A = 1, same output size as the baselines).
  ours_dir   our fused kernel, payload "direction" (A = 3 output rows: three value sums per edge).

Flops are counted identically for all designs, per edge and head: 2 D for q.k plus 2 C A for the
weighted value sum (A = 1 except ours_dir); softmax, envelope and gathers are not counted, and
sdpa's dense N x N work is not credited. fwd+bwd counts 3x the forward flops.
"Minimum bytes" is the compulsory HBM traffic: each input read once and each output written
once (float32, int64 indices). Forward: q, k, v, indices, output; ours also reads the edge vector
and 3 edge scalars per head and writes the log-sum-exp. fwd+bwd adds reading the forward inputs,
output and output gradient again and writing the input gradients (ours: also the edge gradients).
Achieved bytes/s is reported against a device-to-device copy bandwidth measured in the same run.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl

from e2former_calc.kernels.neighbor_attention import neighbor_attention, transpose_neighbors
from e2former_calc.kernels.neighbor_attention_reference import neighbor_attention_reference

HEADS, HEAD_DIM, VALUE_DIM, CUTOFF = 16, 16, 64, 5.0
TIME_BUDGET_S = 320.0  # stop starting new cases after this, so the run stays under 6 minutes


# ----------------------------------------------------------------------------- the split design


@triton.jit
def _split_logits_kernel(Q, K, IDX, S, N, H, D, KN, scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """S[i, k, h] = <Q[i, h], K[IDX[i, k], h]> * scale for a tile of targets and one head."""
    head = tl.program_id(1)
    node = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = node < N
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + ((node * H + head) * D)[:, None] + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    for step in range(0, KN):
        src = tl.load(IDX + node * KN + step, mask=ok, other=0)
        key = tl.load(K + ((src * H + head) * D)[:, None] + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
        tl.store(S + (node * KN + step) * H + head, tl.sum(q * key, axis=1) * scale, mask=ok)


@triton.jit
def _split_weighted_sum_kernel(P, V, IDX, OUT, N, H, C, KN, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[i, h] = sum_k P[i, k, h] V[IDX[i, k], h] for a tile of targets and one head."""
    head = tl.program_id(1)
    node = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = node < N
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for step in range(0, KN):
        src = tl.load(IDX + node * KN + step, mask=ok, other=0)
        p = tl.load(P + (node * KN + step) * H + head, mask=ok, other=0.0)
        val = tl.load(V + ((src * H + head) * C)[:, None] + offs_c[None, :], mask=ok[:, None] & (offs_c[None, :] < C), other=0.0)
        acc += p[:, None] * val
    tl.store(OUT + ((node * H + head) * C)[:, None] + offs_c[None, :], acc, mask=ok[:, None] & (offs_c[None, :] < C))


def split_attention(query, key, value, idx, block_m=32):
    """Logits kernel -> PyTorch softmax over an N x K x H tensor -> weighted-sum kernel."""
    num_nodes, heads, head_dim = query.shape
    neighbours = idx.shape[1]
    grid = (triton.cdiv(num_nodes, block_m), heads)
    logits = query.new_empty(num_nodes, neighbours, heads)
    _split_logits_kernel[grid](query, key, idx, logits, num_nodes, heads, head_dim, neighbours, head_dim**-0.5,
                               BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(head_dim))
    probability = torch.softmax(logits, dim=1)
    out = value.new_empty(num_nodes, heads, value.shape[-1])
    _split_weighted_sum_kernel[grid](probability, value, idx, out, num_nodes, heads, value.shape[-1], neighbours,
                                     BLOCK_M=block_m, BLOCK_C=triton.next_power_of_2(value.shape[-1]))
    return out


# ----------------------------------------------------------------------------- other designs


def naive_attention(query, key, value, idx):
    """Edge-centric PyTorch: explicit gathers of keys and values."""
    num_nodes, neighbours = idx.shape
    gathered_key = key[idx]  # [N, K, H, D]
    scores = (query[:, None] * gathered_key).sum(-1) / math.sqrt(query.shape[-1])
    alpha = torch.softmax(scores, dim=1)  # [N, K, H]
    gathered_value = value[idx]  # [N, K, H, C]
    return (alpha[..., None] * gathered_value).sum(1)


def dense_mask(idx):
    num_nodes = idx.shape[0]
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, idx, True)
    return mask


def sdpa_attention(query, key, value, mask):
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None], attn_mask=mask
    )
    return out[0].transpose(0, 1)


def random_neighbours(num_nodes, neighbours, device, generator):
    """[N, K] source indices; distinct per row while a per-row permutation is affordable."""
    if num_nodes > 32768:
        return torch.randint(0, num_nodes, (num_nodes, neighbours), device=device, generator=generator)
    rows = []
    for start in range(0, num_nodes, 1024):
        count = min(1024, num_nodes - start)
        noise = torch.rand(count, num_nodes, device=device, generator=generator)
        rows.append(noise.topk(neighbours, dim=1).indices)
    return torch.cat(rows)


def make_problem(num_nodes, neighbours, device, seed=0, dtype=torch.float32):
    """Node tensors, the N x K index table and the equivalent CSR inputs of our op."""
    generator = torch.Generator(device=device).manual_seed(seed)
    num_edges = num_nodes * neighbours

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=generator, dtype=dtype)

    idx = random_neighbours(num_nodes, neighbours, device, generator)
    direction = randn(num_edges, 3)
    length = 0.8 + (0.95 * CUTOFF - 0.8) * torch.rand(num_edges, 1, device=device, generator=generator, dtype=dtype)
    return dict(
        query=randn(num_nodes, HEADS, HEAD_DIM),
        key=randn(num_nodes, HEADS, HEAD_DIM),
        value=randn(num_nodes, HEADS, VALUE_DIM),
        idx=idx,
        edge_vector=direction / direction.norm(dim=1, keepdim=True) * length,
        logit_scale=1.0 + 0.1 * randn(num_edges, HEADS),
        logit_bias=0.1 * randn(num_edges, HEADS),
        value_weight=randn(num_edges, HEADS),
        row_ptr=torch.arange(0, num_edges + 1, neighbours, device=device),
        source_index=idx.reshape(-1),
    )


OUR_INPUTS = ["query", "key", "value", "edge_vector", "logit_scale", "logit_bias", "value_weight"]


def ours(problem, payload, transpose, use_kernel=True):
    return neighbor_attention(*(problem[n] for n in OUR_INPUTS), problem["row_ptr"], problem["source_index"], CUTOFF,
                              payload=payload, transpose=transpose, use_kernel=use_kernel)


def build_case(design, problem):
    """(forward callable, differentiable inputs, payload width A) of one design, or None if n/a."""
    q, k, v, idx = problem["query"], problem["key"], problem["value"], problem["idx"]
    if design == "naive":
        return (lambda: naive_attention(q, k, v, idx)), [q, k, v], 1
    if design == "sdpa":
        mask = dense_mask(idx)
        return (lambda: sdpa_attention(q, k, v, mask)), [q, k, v], 1
    if design == "split":
        return (lambda: split_attention(q, k, v, idx)), None, 1
    if design == "torch_ref":
        return (lambda: ours(problem, "inverse_distance", None, use_kernel=False)), [problem[n] for n in OUR_INPUTS], 1
    payload = {"ours_inv": "inverse_distance", "ours_dir": "direction"}[design]
    transpose = transpose_neighbors(problem["row_ptr"], problem["source_index"])  # cached per graph, as in the model
    width = 3 if payload == "direction" else 1
    return (lambda: ours(problem, payload, transpose)), [problem[n] for n in OUR_INPUTS], width


def minimum_bytes(design, num_nodes, neighbours, width, backward):
    """Compulsory HBM traffic in bytes (see module docstring)."""
    f, i = 4, 8
    num_edges = num_nodes * neighbours
    node_in = num_nodes * HEADS * (2 * HEAD_DIM + VALUE_DIM) * f
    out = num_nodes * width * HEADS * VALUE_DIM * f
    edge_in = num_edges * i + (num_edges * (3 + 3 * HEADS) * f if design.startswith("ours") or design == "torch_ref" else 0)
    forward = node_in + edge_in + out
    if not backward:
        return forward
    edge_grads = num_edges * (3 + 3 * HEADS) * f if design.startswith("ours") or design == "torch_ref" else 0
    return forward + (node_in + edge_in + 2 * out) + (node_in + edge_grads)


# ----------------------------------------------------------------------------- timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(step, device, warmup, reps):
    """Mean and min latency in ms of step(); warm-up and repetition counts shrink for slow calls."""
    start = time.perf_counter()
    step()
    synchronize(device)
    first_s = time.perf_counter() - start
    if first_s > 0.5:
        warmup, reps = 1, 3
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            begin.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - start))
    return sum(times) / len(times), min(times), warmup, reps


def copy_bandwidth(device, megabytes=1024):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    source = torch.empty(megabytes * 2**18, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    mean_ms, *_ = time_calls(lambda: target.copy_(source), device, warmup=5, reps=20)
    del source, target
    return 2 * megabytes * 2**20 / (mean_ms * 1e-3)


def run_case(design, problem, mode, device, warmup, reps, bandwidth):
    num_nodes, neighbours = problem["idx"].shape
    record = dict(design=design, mode=mode, N=num_nodes, K=neighbours, H=HEADS, D=HEAD_DIM, C=VALUE_DIM)
    case = build_case(design, problem)
    forward, inputs, width = case
    if mode == "fwd+bwd" and inputs is None:
        return dict(record, status="n/a (no backward)")
    record["A"] = width
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
    else:
        for tensor in inputs:
            tensor.requires_grad_(True)
        grad_out = None

        def step():
            nonlocal grad_out
            out = forward()
            if grad_out is None:
                grad_out = torch.ones_like(out)
            torch.autograd.grad(out, inputs, grad_out)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    mean_ms, min_ms, used_warmup, used_reps = time_calls(step, device, warmup, reps)
    flops = num_nodes * neighbours * HEADS * (2 * HEAD_DIM + 2 * VALUE_DIM * width) * (3 if mode == "fwd+bwd" else 1)
    moved = minimum_bytes(design, num_nodes, neighbours, width, mode == "fwd+bwd")
    record.update(status="ok", mean_ms=mean_ms, min_ms=min_ms, warmup=used_warmup, reps=used_reps,
                  tflops=flops / (mean_ms * 1e-3) / 1e12, min_bytes=moved, bytes_per_s=moved / (mean_ms * 1e-3))
    if bandwidth:
        record["fraction_of_copy_bw"] = record["bytes_per_s"] / bandwidth
    if device.type == "cuda":
        record["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        record["peak_above_inputs_mib"] = (torch.cuda.max_memory_allocated() - resident) / 2**20
    return record


def guarded_case(design, problem, mode, device, warmup, reps, bandwidth):
    try:
        return run_case(design, problem, mode, device, warmup, reps, bandwidth)
    except torch.OutOfMemoryError:
        status = "OOM"
    except RuntimeError as error:  # e.g. an SDPA backend refusing the shapes, or a CUDA OOM in a library
        status = "OOM" if "out of memory" in str(error).lower() else f"error: {str(error).splitlines()[0][:200]}"
    finally:
        for tensor in problem.values():
            tensor.requires_grad_(False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    num_nodes, neighbours = problem["idx"].shape
    return dict(design=design, mode=mode, N=num_nodes, K=neighbours, status=status)


# ----------------------------------------------------------------------------- correctness


def correctness_check(device, num_nodes=300, max_neighbours=40):
    """Ours (Triton) vs the PyTorch reference on a ragged graph: output and all gradients, fp32 and fp64."""
    results = {}
    generator = torch.Generator(device="cpu").manual_seed(1)
    degrees = torch.randint(0, max_neighbours + 1, (num_nodes,), generator=generator)
    degrees[:5] = 0
    for dtype, tolerance in [(torch.float32, 1e-4), (torch.float64, 1e-10)]:
        problem = make_problem(num_nodes, max_neighbours, device, seed=2, dtype=dtype)
        keep = (torch.arange(max_neighbours)[None, :] < degrees[:, None]).reshape(-1).to(device)
        row_ptr = torch.zeros(num_nodes + 1, dtype=torch.int64, device=device)
        row_ptr[1:] = torch.cumsum(degrees.to(device), 0)
        problem.update(row_ptr=row_ptr, source_index=problem["source_index"][keep],
                       **{n: problem[n][keep] for n in ["edge_vector", "logit_scale", "logit_bias", "value_weight"]})
        for payload in ["inverse_distance", "direction"]:
            outputs = []
            for use_kernel in (False, True):
                inputs = {n: problem[n].clone().requires_grad_() for n in OUR_INPUTS}
                out = ours(dict(problem, **inputs), payload, None, use_kernel=use_kernel)
                grad_out = torch.sin(torch.arange(out.numel(), device=device, dtype=dtype)).reshape(out.shape)
                outputs.append([out, *torch.autograd.grad(out, list(inputs.values()), grad_out)])
            errors = {name: float((got - want).detach().abs().max() / want.detach().abs().max().clamp_min(1e-30))
                      for name, want, got in zip(["out", *OUR_INPUTS], *outputs)}
            results[f"{payload}/{str(dtype).split('.')[-1]}"] = dict(max_relative_error=errors,
                                                                     passed=max(errors.values()) < tolerance)
    return results


# ----------------------------------------------------------------------------- driver


def environment(args):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    device = torch.device(args.device)
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=commit, command=" ".join([sys.executable, *sys.argv]),
    )


TABLE_HEADER = f"{'design':<10} {'mode':<8} {'N':>8} {'K':>4} {'ms':>10} {'TFLOPS':>7} {'GB/s':>7} {'%copy':>6} {'peak MiB':>9}"


def table_row(r):
    head = f"{r['design']:<10} {r['mode']:<8} {r['N']:>8} {r['K']:>4}"
    if r.get("status") != "ok":
        return f"{head} {r['status']}"
    return (f"{head} {r['mean_ms']:>10.3f} {r['tflops']:>7.2f} {r['bytes_per_s'] / 1e9:>7.1f} "
            f"{100 * r.get('fraction_of_copy_bw', 0):>6.1f} {r.get('peak_mib', float('nan')):>9.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/bench_attention.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU: naive, sdpa and torch_ref only")
    parser.add_argument("--large", action="store_true", help="also ours at N = 2^17 ... 2^20")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    device = torch.device(args.device)
    started = time.perf_counter()

    if args.quick:
        sizes, neighbours, sweep = [64, 128], 8, []
        designs, warmup, reps = ["naive", "sdpa", "torch_ref"], 1, 3
    else:
        sizes, neighbours, sweep = [128, 512, 2048, 8192, 32768], 64, [16, 32, 64, 128]
        designs, warmup, reps = ["naive", "sdpa", "split", "torch_ref", "ours_inv", "ours_dir"], 10, 50
    if device.type != "cuda":
        designs = [d for d in designs if d in ("naive", "sdpa", "torch_ref")]

    timing = "CUDA events" if device.type == "cuda" else "perf_counter"
    protocol = dict(H=HEADS, D=HEAD_DIM, C=VALUE_DIM, cutoff=CUTOFF, dtype="float32", warmup=warmup, reps=reps, timing=timing)
    report = dict(environment(args), protocol=protocol)
    if device.type == "cuda":
        report["correctness"] = correctness_check(device)
        print("correctness (ours vs reference):", {k: v["passed"] for k, v in report["correctness"].items()})
        report["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
        print(f"device-to-device copy: {report['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s")
    bandwidth = report.get("copy_bandwidth_bytes_per_s")

    plan = []  # (section, design, N, K, mode)
    for num_nodes in sizes:
        for design in designs:
            if design == "torch_ref" and num_nodes > 8192:
                continue
            plan += [("N sweep", design, num_nodes, neighbours, mode) for mode in ("fwd", "fwd+bwd")]
    for k in sweep:  # K = 64 at N = 32768 is already in the N sweep
        if k == neighbours:
            continue
        for design in ["naive", "split", "ours_inv", "ours_dir"]:
            plan += [("K sweep", design, 32768, k, mode) for mode in ("fwd", "fwd+bwd")]
    if args.large and device.type == "cuda":
        for num_nodes in [2**17, 2**18, 2**19, 2**20]:
            plan += [("large", d, num_nodes, neighbours, m) for d in ["ours_inv", "ours_dir"] for m in ("fwd", "fwd+bwd")]

    print(TABLE_HEADER)
    records, problem, problem_key = [], None, None
    for section, design, num_nodes, k, mode in plan:
        if time.perf_counter() - started > TIME_BUDGET_S:
            records.append(dict(section=section, design=design, mode=mode, N=num_nodes, K=k, status="skipped: time budget"))
            continue
        if problem_key != (num_nodes, k):
            problem = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            problem, problem_key = make_problem(num_nodes, k, device), (num_nodes, k)
        record = guarded_case(design, problem, mode, device, warmup, reps, bandwidth)
        records.append(dict(section=section, **record))
        print(table_row(record), flush=True)
    report["results"] = records
    report["wall_s"] = time.perf_counter() - started

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
