"""Latency, throughput and memory of sparse neighbour attention designs (paper appendix A protocol).

    python -m benchmarks.bench_attention --out DIR                      # GPU, the whole protocol, < 6 min
    TRITON_INTERPRET=1 python -m benchmarks.bench_attention --smoke     # CPU: tiny sizes, every code path

Writes DIR/bench_attention.json (DIR defaults to $OUT, else benchmarks/results) and prints a table.

Every target attends to K random sources (distinct per row for N <= 32768). fp32, H = 16 heads,
D = 16 query/key width per head, C = 64 value channels per head; 10 warm-ups and 50 timed runs,
each timed with its own CUDA event pair (1 and 3 when one call takes over 0.5 s, recorded).
Designs, side by side:

  naive      PyTorch gather: materialises N x K x H x D keys and N x K x H x C values, softmax, sum.
  sdpa       torch scaled_dot_product_attention with a dense N x N boolean neighbour mask
             (mask built once, not timed; "OOM" once it does not fit).
  split      the public reference code's design: a Triton q.k kernel writing N x K x H logits,
             PyTorch softmax on them, a Triton weighted-sum kernel (forward only: it has no backward).
  torch_ref  our op in plain PyTorch (kernels/neighbor_attention_reference.py), N <= 2048 only.
  ours_inv   our fused kernel, payload "inverse_distance" (A = 1, same output size as the baselines).
  ours_dir   our fused kernel, payload "direction" (A = 3 output rows: three value sums per edge).

Sections, in order (a time budget stops starting new cases, recorded as skipped): correctness of
ours against the reference (max abs / relative error of the output and all 7 gradients, fp32 and
fp64, both payloads, ragged graph with zero-neighbour atoms); device-to-device copy bandwidth;
the N sweep {128 ... 32768} at K = 64; the K sweep {16, 32, 64, 128} at N = 32768; "locality":
naive and ours at N = 32768 with each atom's neighbours drawn from the 1024 atoms around it in
index order (as after a Morton sort), so that gathers hit L1/L2; "large": ours at N = 2^17 ... 2^20;
"graphs" (CUDA only): naive, sdpa and ours at N = 128, 512, 2048 with each call captured once in a CUDA graph
and replayed, which removes the host's launch overhead (what a small system pays in our CUDA-graph MD).
--sections and --sizes pick a subset, e.g. ``--sections "N sweep" graphs --sizes 128 512 2048``.

Flops are counted identically for all designs, per edge and head: 2 D for q.k plus 2 C A for the
weighted value sum (A = 1 except ours_dir); softmax, envelope and gathers are not counted, and
sdpa's dense N x N work is not credited. fwd+bwd counts 3x the forward flops.
"Minimum bytes" is the compulsory HBM traffic: each input read once and each output written
once (float32, int64 indices). Forward: q, k, v, indices, output; ours also reads the edge vector
and 3 edge scalars per head and writes the log-sum-exp. fwd+bwd adds reading the forward inputs,
output and output gradient again and writing the input gradients (ours: also the edge gradients).
The gathers of k_j and v_j (4 (D + C) H bytes per edge, 5 KiB here) are not in the minimum: with
random neighbours they come from L2 or HBM, row by row. "Gathered bytes" (ours only) adds them: the node
rows each edge reads in our kernels when no row is reused on chip, forward k_j and v_j, backward k_j and v_j
again (edge kernel), k_j (d query) and q_i, the A rows of dOut_i and lse_i (source side), plus the edge
streams the backward reads more than once, the per-edge gradients written and the head sum of d edge_vector. With random neighbours and k, v larger than L2
(168 MB at N = 32768) this is what the memory system must serve.
Achieved bytes/s is reported against the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import triton
import triton.language as tl

from benchmarks.common import copy_bandwidth, environment, guarded, time_calls
from e2former_calc.cuda_graph import capture
from e2former_calc.kernels.neighbor_attention import neighbor_attention, transpose_neighbors

HEADS, HEAD_DIM, VALUE_DIM, CUTOFF = 16, 16, 64, 5.0
SMOKE_SHAPE = (2, 4, 8)  # H, D, C of --smoke: the CPU interpreter runs ~1000x slower than eager
OUR_INPUTS = ["query", "key", "value", "edge_vector", "logit_scale", "logit_bias", "value_weight"]
LOCAL_WINDOW = 1024


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


def ours(problem, payload, transpose, use_kernel=True):
    return neighbor_attention(*(problem[n] for n in OUR_INPUTS), problem["row_ptr"], problem["source_index"], CUTOFF,
                              payload=payload, transpose=transpose, use_kernel=use_kernel)


# ----------------------------------------------------------------------------- problems


def random_neighbours(num_nodes, neighbours, device, generator, local=False):
    """[N, K] source indices: distinct per row while a per-row permutation is affordable (N <= 32768),
    uniform over all atoms, or (local) over the LOCAL_WINDOW atoms around the target."""
    if local:
        window = min(LOCAL_WINDOW, num_nodes)
        offset = torch.randint(0, window, (num_nodes, neighbours), device=device, generator=generator)
        first = (torch.arange(num_nodes, device=device) - window // 2).clamp(0, num_nodes - window)
        return first[:, None] + offset
    if num_nodes > 32768:
        return torch.randint(0, num_nodes, (num_nodes, neighbours), device=device, generator=generator)
    rows = []
    for start in range(0, num_nodes, 1024):
        noise = torch.rand(min(1024, num_nodes - start), num_nodes, device=device, generator=generator)
        rows.append(noise.topk(neighbours, dim=1).indices)
    return torch.cat(rows)


def make_problem(num_nodes, neighbours, device, seed=0, dtype=torch.float32, local=False,
                 shape=(HEADS, HEAD_DIM, VALUE_DIM)):
    """Node tensors [N, H, D or C] (shape = (H, D, C)), the N x K index table and the equivalent CSR inputs of our op."""
    heads, head_dim, value_dim = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    num_edges = num_nodes * neighbours

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=generator, dtype=dtype)

    idx = random_neighbours(num_nodes, neighbours, device, generator, local)
    direction = randn(num_edges, 3)
    length = 0.8 + (0.95 * CUTOFF - 0.8) * torch.rand(num_edges, 1, device=device, generator=generator, dtype=dtype)
    return dict(
        query=randn(num_nodes, heads, head_dim),
        key=randn(num_nodes, heads, head_dim),
        value=randn(num_nodes, heads, value_dim),
        idx=idx,
        edge_vector=direction / direction.norm(dim=1, keepdim=True) * length,
        logit_scale=1.0 + 0.1 * randn(num_edges, heads),
        logit_bias=0.1 * randn(num_edges, heads),
        value_weight=randn(num_edges, heads),
        row_ptr=torch.arange(0, num_edges + 1, neighbours, device=device),
        source_index=idx.reshape(-1),
    )


def ragged_problem(num_nodes, max_neighbours, device, dtype, shape, seed=2):
    """A CSR problem with random degrees in [0, max_neighbours] and five atoms without neighbours."""
    degrees = torch.randint(0, max_neighbours + 1, (num_nodes,), generator=torch.Generator().manual_seed(1))
    degrees[:5] = 0
    problem = make_problem(num_nodes, max_neighbours, device, seed=seed, dtype=dtype, shape=shape)
    keep = (torch.arange(max_neighbours)[None, :] < degrees[:, None]).reshape(-1).to(device)
    row_ptr = torch.zeros(num_nodes + 1, dtype=torch.int64, device=device)
    row_ptr[1:] = torch.cumsum(degrees.to(device), 0)
    problem.update(row_ptr=row_ptr, source_index=problem["source_index"][keep],
                   **{n: problem[n][keep] for n in ["edge_vector", "logit_scale", "logit_bias", "value_weight"]})
    return problem


# ----------------------------------------------------------------------------- cases


def build_case(design, problem):
    """(forward callable, differentiable inputs or None, payload width A) of one design."""
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


def problem_sizes(problem):
    """(N, K, H, D, C) of a problem."""
    num_nodes, neighbours = problem["idx"].shape
    return (num_nodes, neighbours, *problem["query"].shape[1:], problem["value"].shape[-1])


def minimum_bytes(design, sizes, width, backward):
    """Compulsory HBM traffic in bytes (see module docstring) for sizes = (N, K, H, D, C)."""
    num_nodes, neighbours, heads, head_dim, value_dim = sizes
    f, i = 4, 8
    num_edges = num_nodes * neighbours
    edge_terms = design.startswith("ours") or design == "torch_ref"
    node_in = num_nodes * heads * (2 * head_dim + value_dim) * f
    out = num_nodes * width * heads * value_dim * f + (num_nodes * heads * f if edge_terms else 0)
    edge_in = num_edges * i + (num_edges * (3 + 3 * heads) * f if edge_terms else 0)
    forward = node_in + edge_in + out
    if not backward:
        return forward
    edge_grads = num_edges * (3 + 3 * heads) * f if edge_terms else 0
    return forward + (node_in + edge_in + 2 * out) + (node_in + edge_grads)


def gathered_bytes(sizes, width, backward):
    """Our kernels' traffic when no gathered node row is reused on chip (see module docstring)."""
    num_nodes, neighbours, heads, head_dim, value_dim = sizes
    num_edges, f, i = num_nodes * neighbours, 4, 8
    rows = num_edges * heads * (head_dim + value_dim) * f  # k_j, v_j
    moved = minimum_bytes("ours", sizes, width, backward) + rows
    if backward:
        rows_query = num_edges * heads * head_dim * f  # k_j for d query
        rows_source_side = num_edges * heads * (head_dim + width * value_dim + 1) * f  # q_i, dOut_i, lse_i
        # d edge_vector per head written and read by the head sum (3H + 3H); g and d logit_bias for d query
        # (2H); the source side's edge vector, scalars and d logit_bias (3 + 4H); four more indices (target of
        # each edge, the source index again, the two of the transposed CSR)
        edge_extra = num_edges * ((12 * heads + 3) * f + 4 * i)
        moved += rows + rows_query + rows_source_side + edge_extra
    return moved


def captured(step):
    """`step` captured once in a CUDA graph (after three warm-up calls); returns the graph's replay."""
    return capture(step, warmup_calls=3)[0].replay


def measure(design, problem, mode, warmup, reps, bandwidth, graph=False):
    """Time one (design, mode) on a problem, eagerly or replaying a CUDA graph of the call: the
    record's measured fields (raises on failure)."""
    sizes = problem_sizes(problem)
    num_nodes, neighbours, heads, head_dim, value_dim = sizes
    forward, inputs, width = build_case(design, problem)
    if mode == "fwd+bwd" and inputs is None:
        return dict(status="n/a (no backward)")
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
    else:
        for tensor in inputs:
            tensor.requires_grad_(True)
        grad_out = []

        def step():
            out = forward()
            if not grad_out:
                grad_out.append(torch.ones_like(out))
            torch.autograd.grad(out, inputs, grad_out[0])

    on_gpu = problem["query"].is_cuda
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    timing = time_calls(captured(step) if graph else step, warmup, reps)
    flops = num_nodes * neighbours * heads * (2 * head_dim + 2 * value_dim * width) * (3 if mode == "fwd+bwd" else 1)
    moved = minimum_bytes(design, sizes, width, mode == "fwd+bwd")
    seconds = timing["mean_ms"] * 1e-3
    record = dict(status="ok", A=width, **timing, tflops=flops / seconds / 1e12, min_bytes=moved,
                  bytes_per_s=moved / seconds)
    if design.startswith("ours"):
        record["gathered_bytes"] = gathered_bytes(sizes, width, mode == "fwd+bwd")
        record["gathered_bytes_per_s"] = record["gathered_bytes"] / seconds
    if bandwidth:
        record["fraction_of_copy_bw"] = record["bytes_per_s"] / bandwidth
        if design.startswith("ours"):
            record["gathered_fraction_of_copy_bw"] = record["gathered_bytes_per_s"] / bandwidth
    if on_gpu:
        record["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        record["peak_above_inputs_mib"] = (torch.cuda.max_memory_allocated() - resident) / 2**20
    return record


def run_case(section, design, problem, mode, warmup, reps, bandwidth):
    """The record of one case; failures (OOM, compile errors) become its status."""
    record = dict(zip(["section", "design", "mode", "N", "K", "H", "D", "C"], [section, design, mode, *problem_sizes(problem)]))
    graph = section == "graphs"
    measured, status = guarded(lambda: measure(design, problem, mode, warmup, reps, bandwidth, graph=graph))
    for name in OUR_INPUTS:
        problem[name].requires_grad_(False)
    if problem["query"].is_cuda:
        torch.cuda.empty_cache()
    return dict(record, **(measured or dict(status=status)))


# ----------------------------------------------------------------------------- correctness


def correctness_check(device, num_nodes, max_neighbours, shape):
    """Ours (Triton) vs the PyTorch reference on a ragged graph: output and all 7 gradients,
    fp32 and fp64, both payloads. Max abs error and max error relative to the largest entry."""
    results = {}
    for dtype, tolerance in [(torch.float32, 1e-4), (torch.float64, 1e-10)]:
        problem = ragged_problem(num_nodes, max_neighbours, device, dtype, shape)
        for payload in ["inverse_distance", "direction"]:
            outputs = []
            for use_kernel in (False, True):
                inputs = {n: problem[n].clone().requires_grad_() for n in OUR_INPUTS}
                out = ours(dict(problem, **inputs), payload, None, use_kernel=use_kernel)
                grad_out = torch.sin(torch.arange(out.numel(), device=device, dtype=dtype)).reshape(out.shape)
                outputs.append([out.detach(), *torch.autograd.grad(out, list(inputs.values()), grad_out)])
            absolute = {name: float((got - want).abs().max()) for name, want, got in zip(["out", *OUR_INPUTS], *outputs)}
            relative = {name: absolute[name] / max(float(want.abs().max()), 1e-30)
                        for name, want in zip(["out", *OUR_INPUTS], outputs[0])}
            results[f"{payload}/{str(dtype).split('.')[-1]}"] = dict(
                max_abs_error=absolute, max_relative_error=relative, passed=max(relative.values()) < tolerance)
    return results


def correctness_summary(results):
    return ", ".join(f"{name}: max abs {max(r['max_abs_error'].values()):.1e} "
                     f"rel {max(r['max_relative_error'].values()):.1e} {'ok' if r['passed'] else 'FAILED'}"
                     for name, r in results.items())


# ----------------------------------------------------------------------------- driver


def kernels_available(device):
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


SECTIONS = ("N sweep", "K sweep", "locality", "large", "graphs")


def plan_cases(args, device):
    """[(section, design, N, K, local, mode)] in the order they run."""
    if args.smoke:
        sizes, neighbours, k_sweep, large = [16, 32], 4, [2, 4, 8], [64]
    else:
        sizes, neighbours, k_sweep, large = [128, 512, 2048, 8192, 32768], 64, [16, 32, 64, 128], [2**17, 2**18, 2**19, 2**20]
    small = sizes[:3]
    sizes = args.sizes or sizes
    baselines = ["naive", "sdpa", "split", "torch_ref"] if kernels_available(device) else ["naive", "sdpa", "torch_ref"]
    mine = ["ours_inv", "ours_dir"] if kernels_available(device) else []
    top = sizes[-1]
    modes = ("fwd", "fwd+bwd")
    plan = []
    for num_nodes in sizes:
        for design in baselines + mine:
            if design == "torch_ref" and num_nodes > 2048:
                continue
            plan += [("N sweep", design, num_nodes, neighbours, False, mode) for mode in modes]
    for k in k_sweep:
        if k != neighbours:  # already in the N sweep
            plan += [("K sweep", d, top, k, False, m) for d in ["naive", "split", *mine] if d in baselines + mine for m in modes]
    plan += [("locality", d, top, neighbours, True, m) for d in ["naive", *mine] for m in modes]
    plan += [("large", d, n, neighbours, False, m) for n in large for d in mine for m in modes]
    if device.type == "cuda":
        plan += [("graphs", d, n, neighbours, False, m) for n in small for d in ["naive", "sdpa", *mine] for m in modes]
    return [case for case in plan if args.sections is None or case[0] in args.sections]


TABLE_HEADER = (f"{'section':<9} {'design':<10} {'mode':<8} {'N':>8} {'K':>4} {'ms':>10} {'TFLOPS':>7} "
                f"{'GB/s':>7} {'%copy':>6} {'peak MiB':>9}")


def table_row(r):
    head = f"{r['section']:<9} {r['design']:<10} {r['mode']:<8} {r['N']:>8} {r['K']:>4}"
    if r.get("status") != "ok":
        return f"{head} {r['status']}"
    return (f"{head} {r['mean_ms']:>10.3f} {r['tflops']:>7.2f} {r['bytes_per_s'] / 1e9:>7.1f} "
            f"{100 * r.get('fraction_of_copy_bw', 0):>6.1f} {r.get('peak_mib', float('nan')):>9.0f}")


def headline(records):
    """Ours vs naive at the largest N of the N sweep (K = 64 in the full run)."""
    sweep = [r for r in records if r["section"] == "N sweep" and r.get("status") == "ok"]
    if not sweep:
        return []
    top = max(r["N"] for r in sweep)
    by_case = {(r["design"], r["mode"]): r for r in sweep if r["N"] == top}
    lines = []
    for (design, mode), r in sorted(by_case.items()):
        naive = by_case.get(("naive", mode))
        if design.startswith("ours") and naive:
            lines.append(f"N={top} {design} {mode}: {r['mean_ms']:.3f} ms, {naive['mean_ms'] / r['mean_ms']:.1f}x naive, "
                         f"{100 * r.get('fraction_of_copy_bw', 0):.0f}% of copy bandwidth "
                         f"({100 * r.get('gathered_fraction_of_copy_bw', 0):.0f}% counting the gathered rows)")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                        help="directory for bench_attention.json (default: $OUT, else benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and heads, one timed run (CPU check of the script)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no new case after this many seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="run only these sections (default: all)")
    parser.add_argument("--sizes", nargs="+", type=int, help="N of the N sweep (default: 128 ... 32768)")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    warmup, reps = (0, 1) if args.smoke else (10, 50)
    shape = SMOKE_SHAPE if args.smoke else (HEADS, HEAD_DIM, VALUE_DIM)

    report = dict(environment(), protocol=dict(H=shape[0], D=shape[1], C=shape[2], cutoff=CUTOFF, dtype="float32",
                                               warmup=warmup, reps=reps, local_window=LOCAL_WINDOW, sections=args.sections,
                                               sizes=args.sizes,
                                               timing="CUDA events" if device.type == "cuda" else "perf_counter"))
    if kernels_available(device):
        sizes = (24, 5) if args.smoke else (300, 40)
        report["correctness"], status = guarded(lambda: correctness_check(device, *sizes, shape))
        print("correctness (ours vs reference):", correctness_summary(report["correctness"]) if report["correctness"] else status)
    bandwidth = None
    if device.type == "cuda":
        bandwidth = report["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
        print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s")

    print(TABLE_HEADER)
    records, problem, problem_key = [], None, None
    for section, design, num_nodes, k, local, mode in plan_cases(args, device):
        if time.perf_counter() - started > args.budget_s:
            records.append(dict(section=section, design=design, mode=mode, N=num_nodes, K=k, status="skipped: time budget"))
            continue
        if problem_key != (num_nodes, k, local):
            problem = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            problem, status = guarded(lambda: make_problem(num_nodes, k, device, local=local, shape=shape))
            problem_key = (num_nodes, k, local)
        if problem is None:
            record = dict(section=section, design=design, mode=mode, N=num_nodes, K=k, status=f"inputs: {status}")
        else:
            record = run_case(section, design, problem, mode, warmup, reps, bandwidth)
        records.append(record)
        print(table_row(record), flush=True)
    report["results"] = records
    report["wall_s"] = time.perf_counter() - started
    for line in headline(records):
        print(line)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_attention.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {path} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
