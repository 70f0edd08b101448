"""A whole model evaluation as one CUDA graph launch, captured once per graph object.

On the GPU a small system's MD step is bound by kernel launches, not arithmetic: the water
model's conservative step is ~1000 small kernels, ~40 ms of host time for ~8 ms of GPU work
(benchmarks/results/md_speed_h200.json). `VerletGraphBuilder.static_graph` keeps the graph's
tensors at fixed shapes and addresses and changes their contents in place: the positions at
every step and, in a periodic system, the pairs at each neighbour search too (the edge list is
padded to a fixed capacity). So the evaluation (forward and force pass) is captured once and
replayed at every step as one launch; a new capture follows only a new graph object (a search
that found more pairs than the capacity, or a non-periodic system's search).

    captured = CapturedModel(model)
    graph, order, new = builder.static_graph(atoms)   # the same object while the pairs fit
    outputs = captured(graph, compute_forces=True, mode="conservative")
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from e2former_calc.models.graph import AtomicGraph

Result = TypeVar("Result")


def capture(step: Callable[[], Result], device: torch.device | None = None,
            warmup_calls: int = 1) -> tuple[torch.cuda.CUDAGraph, Result, Result]:
    """`step()` captured in a CUDA graph after `warmup_calls` eager calls on a side stream (capture
    needs them: kernel compilation, lazy initialisation and host reads must not be recorded).

    Returns (the graph, the last eager call's result, the captured call's result, whose tensors
    each `graph.replay()` overwrites).
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            eager = step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, eager, captured


class CapturedModel:
    """`model(graph, **options)` through a CUDA graph captured for that graph object.

    A graph object not seen last time is evaluated eagerly once, on a side stream as capture
    requires — this checks the inputs, compiles the kernels and fills the graph's caches (target
    index, transposed edges), all of which need the host — and then captured. The same object
    again, its tensors updated in place (`AtomicGraph.refill` keeps the caches current), replays
    the capture.
    Replayed outputs are the capture's static tensors, overwritten by the next call: copy what
    you keep. `captures` counts the captures made.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.captures = 0
        self._graph = None  # the AtomicGraph captured (held, so that `is` cannot match a new object)
        self._options = None
        self._cuda_graph = None
        self._outputs = None

    def __call__(self, graph: AtomicGraph, **options) -> dict[str, torch.Tensor]:
        if graph is self._graph and options == self._options:
            self._cuda_graph.replay()
            return self._outputs
        return self._capture(graph, options)

    def _capture(self, graph: AtomicGraph, options: dict) -> dict[str, torch.Tensor]:
        # Release the previous capture and its private memory pool first (a reset graph's pool
        # cannot be handed to a new capture: the caching allocator asserts).
        self._graph = self._outputs = self._cuda_graph = None
        self._cuda_graph, eager, self._outputs = capture(lambda: self.model(graph, **options), graph.positions.device)
        self._graph, self._options = graph, dict(options)
        self.captures += 1
        return eager
