"""CUDA graphs for the torch engine: one captured forward pass per batch shape, replayed.

A DenseNet-121 forward pass is a few hundred small kernels; at batch 1-32 on a GPU the
launches, not the arithmetic, set the pace. A CUDA graph records them once and replays
them with one launch. Each shape gets its own graph and static input buffer (a new
shape is captured on first sight, up to ``max_graphs``; beyond that, eager), all drawing
on one shared memory pool: a graph's output is read before the next replay, which is
what sharing a pool requires.

Autocast runs inside the capture with its weight-cast cache off, as PyTorch requires
for graphs (the cache would hold tensors from outside the graph's pool).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]
WARMUP_ITERS = 3  # cuDNN picks its algorithms and the allocator settles before the capture


class CudaGraphs:
    """``forward`` through captured graphs, one per input shape."""

    def __init__(self, forward: Forward, autocast: Callable[[], contextlib.AbstractContextManager],
                 *, max_graphs: int = 8) -> None:
        self.forward = forward
        self.autocast = autocast
        self.max_graphs = max_graphs
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return sorted(self._graphs)

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = torch.empty_like(x)  # keeps x's memory format (channels_last)
        static_in.copy_(x)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                with self.autocast():
                    self.forward(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self.autocast():
            static_out = self.forward(static_in)
        entry = (graph, static_in, static_out)
        self._graphs[tuple(x.shape)] = entry
        return entry

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        entry = self._graphs.get(tuple(x.shape))
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                with self.autocast():
                    return self.forward(x)
            entry = self._capture(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out  # read (softmax) before the next replay overwrites it
