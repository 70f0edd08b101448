"""What every benchmark script shares: the run's environment record and a CUDA-aware timer."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
import time

import torch


def environment() -> dict:
    """Device, versions, date, git commit and command line of this run (for results files)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    return record


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
