"""What every benchmark script shares: the run's environment record, CUDA-aware timers, the
device-to-device copy bandwidth, and a guard that turns a failing case into a recorded status."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

import torch

from e2former_calc.provenance import source_commit
from kernels.neighbor_attention import CONFIG_ENV


def environment() -> dict:
    """Device, versions, date, git commit and command line of this run (for results files), and the
    attention launch-table override when one is set (it changes timings, not results)."""
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
        "command": " ".join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    if os.environ.get(CONFIG_ENV):
        record[CONFIG_ENV] = os.environ[CONFIG_ENV]
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    return record


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_device_time(function, repeats: int, on_gpu: bool) -> list[dict]:
    """[{name, calls, ms}] per call of `function` under torch.profiler, largest first: each kernel
    or op by its self device time (CUDA time on the GPU, CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as profiler:
        for _ in range(repeats):
            function()
        synchronize()
    rows = []
    for event in profiler.key_averages():
        device_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if device_us > 0:
            rows.append({"name": event.key, "calls": event.count / repeats, "ms": device_us / 1000 / repeats})
    return sorted(rows, key=lambda row: -row["ms"])


def print_profile_rows(rows: list[dict], total_ms: float, limit: int) -> None:
    """The `limit` largest rows of a `profile_device_time` table, with their share of `total_ms`."""
    for row in rows[:limit]:
        print(f"  {row['ms']:9.3f} ms {100 * row['ms'] / total_ms:5.1f}%  x{row['calls']:<5g} {row['name'][:90]}")


def time_cuda(function, warmup: int, repeats: int) -> float:
    """Mean seconds per call of `function()` after `warmup` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    start_time = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start_time) / repeats


def time_calls(function, warmup: int, repeats: int, slow_s: float = 0.5) -> dict:
    """Per-call latency of `function()`: mean_ms, min_ms and the warm-up / repeat counts used.

    One untimed call first (compilation, allocator); if it took over `slow_s` seconds the counts
    drop to 1 warm-up and 3 repeats, so that slow baselines fit in a run's time budget.
    Each call is timed on its own (CUDA event pair on GPU, perf_counter on CPU).
    """
    start = time.perf_counter()
    function()
    synchronize()
    if time.perf_counter() - start > slow_s:
        warmup, repeats = 1, 3
    for _ in range(warmup):
        function()
    synchronize()
    if torch.cuda.is_available():
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for begin, end in events:
            begin.record()
            function()
            end.record()
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            function()
            times.append(1e3 * (time.perf_counter() - begin))
    return dict(mean_ms=sum(times) / len(times), min_ms=min(times), warmup=warmup, reps=repeats)


def copy_bandwidth(device: torch.device, megabytes: int = 1024) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    source = torch.empty(megabytes * 2**18, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    mean_ms = time_calls(lambda: target.copy_(source), warmup=5, repeats=20)["mean_ms"]
    return 2 * megabytes * 2**20 / (mean_ms * 1e-3)


def failure_status(error: BaseException) -> str:
    """A one-line status for a case that raised: "OOM" or "error: <type>: <first line>"."""
    text = str(error).strip()
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "OOM"
    first_line = text.splitlines()[0][:200] if text else ""
    return f"error: {type(error).__name__}: {first_line}"


def guarded(function):
    """(function(), "ok"), or (None, failure_status) if it raised (compile error, OOM, ...).

    The CUDA caching allocator is emptied after a failure so that the next case starts clean.
    """
    try:
        return function(), "ok"
    except Exception as error:  # noqa: BLE001 -- recording any failure of a case is the point
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, failure_status(error)
