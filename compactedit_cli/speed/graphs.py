"""One denoising step replayed as a CUDA graph, so the host launches it with one call instead of one per kernel.

It is for steps short enough that the host's launching shows (a distilled step; a 3-way guided step keeps a large GPU
busy on its own: BENCHMARKS.md has the numbers). The price: the inputs are copied into fixed buffers first, the
step's activations keep their own memory pool for as long as the graph lives, and the weights must stay where they
were at capture (so no weight offload).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.utils import _pytree as pytree

CAPTURE_FAILED = "CUDA graph capture failed"  # how a failed capture begins its warning and its report line


class GraphedStep:
    """Calls ``step(*args)`` through a CUDA graph captured for the latest input shapes; eager where it cannot.

    ``args`` are tensors or tuples of tensors. The call that meets a new shape runs the step once eagerly on a side
    stream (cuBLAS workspaces, lazy inits and any compiling happen there, and its result answers the call), then
    captures. Only one graph is kept: a new shape (another size bin, another batch) captures again and frees the old
    pool. Each call returns a fresh tensor, so nothing a caller keeps is overwritten by the next replay.
    """

    def __init__(self, step: Callable[..., torch.Tensor]) -> None:
        self.step = step
        self.captures = 0
        self.failure: str | None = None
        self._signature: Any = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[torch.Tensor] = []
        self._output: torch.Tensor | None = None

    def __call__(self, *args: Any) -> torch.Tensor:
        tensors, spec = pytree.tree_flatten(args)
        if self.failure is not None or tensors[0].device.type != "cuda":
            return self.step(*args)
        signature = (spec, [(t.shape, t.dtype, t.device) for t in tensors])
        if signature != self._signature:
            self.release()
            try:
                result = self._capture(tensors, spec)
            except torch.OutOfMemoryError:  # the caller's to handle (batch retries smaller); capture again next time
                self.release()
                raise
            except RuntimeError as error:  # an op the graph cannot hold: say so once, then stay eager
                self.release()
                self.failure = str(error).splitlines()[0]
                warnings.warn(f"{CAPTURE_FAILED}, running eagerly: {self.failure}", RuntimeWarning, 2)
                return self.step(*args)
            self._signature = signature
            return result
        for buffer, tensor in zip(self._inputs, tensors, strict=True):
            buffer.copy_(tensor)
        self._graph.replay()
        return self._output.clone()

    def _capture(self, tensors: list[torch.Tensor], spec: pytree.TreeSpec) -> torch.Tensor:
        """Warm up on a side stream, then capture; returns the warm-up's result, which is this call's answer."""
        self._inputs = [t.clone() for t in tensors]
        args = pytree.tree_unflatten(self._inputs, spec)
        main = torch.cuda.current_stream(tensors[0].device)
        # Capturing synchronises the device once; that is set-up, not a sync inside the loop, so the loop's
        # sync check (``torch.cuda.set_sync_debug_mode``) is paused around it.
        debug_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            side = torch.cuda.Stream(tensors[0].device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                result = self.step(*args)
            main.wait_stream(side)
            result.record_stream(main)  # made on the side stream, used on the main one
            graph = torch.cuda.CUDAGraph()
            # The same stream again: compiled code may guard on the current stream, and a compile that starts inside
            # a capture breaks it and leaves the CUDA RNG unusable. So any compile still wanted now raises instead.
            with torch.cuda.graph(graph, stream=side), no_compiling():
                self._output = self.step(*args)
        finally:
            torch.cuda.set_sync_debug_mode(debug_mode)
            torch.cuda.set_stream(main)  # a failed capture_end leaves torch.cuda.graph's capture stream current
        self._graph = graph
        self.captures += 1
        return result

    def release(self) -> None:
        """Drop the graph and its memory pool (the next CUDA call captures again)."""
        self._graph = None
        self._inputs = []
        self._output = None
        self._signature = None


def no_compiling() -> AbstractContextManager[None]:
    """While active, a ``torch.compile``d function that would compile raises (a ``RuntimeError``) instead."""
    return torch.compiler.set_stance("fail_on_recompile")
