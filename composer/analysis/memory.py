"""Peak memory of a block of code, for ``compose bench``.

On CUDA, ``torch.cuda.max_memory_allocated`` above the allocation before the block (torch's own
allocations) or the device memory in use sampled every 5 ms (all of the device's, e.g. ONNX
Runtime's, which torch does not see). On a CPU ``tracemalloc`` sees nothing of torch's or ONNX
Runtime's native allocations, so the peak resident set size (RSS) is read instead: Linux's
``/proc/self/clear_refs`` resets the peak (VmHWM) to the current RSS when the block starts and
VmHWM is read when it ends, after ``malloc_trim`` hands freed heap memory back. Where
``clear_refs`` is not available the ``ru_maxrss`` increase is reported, a lower bound (it only
grows past the process's earlier peak).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from pathlib import Path

import torch


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the current level while the block runs; ``.bytes`` after it.
    ``kind``: "cpu", "cuda-torch" (torch's allocator) or "cuda-device" (all device memory)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.bytes: int | None = None
        self.method = ""

    def __enter__(self):
        _trim()
        if self.kind == "cuda-torch":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated above the allocation before the runs"
        elif self.kind == "cuda-device":
            free, total = torch.cuda.mem_get_info()
            self.base, self.peak, self.stop = total - free, total - free, threading.Event()

            def sample():
                while not self.stop.wait(0.005):
                    f, t = torch.cuda.mem_get_info()
                    self.peak = max(self.peak, t - f)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
            self.method = "device memory in use (cudaMemGetInfo, sampled every 5 ms) above the level before the runs"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self.base = _proc_status("VmRSS")
                self.method = "peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS before the runs"
            except OSError:
                self.base = None
            if self.base is None:
                import resource

                self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self.method = "ru_maxrss increase (a lower bound: it only grows past the process's earlier peak)"
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda-torch":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.kind == "cuda-device":
            self.stop.set()
            self.thread.join()
            self.bytes = self.peak - self.base
        elif self.method.startswith("peak RSS"):
            self.bytes = (_proc_status("VmHWM") or 0) - self.base
        else:
            import resource

            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        self.bytes = max(0, self.bytes)
        return False


__all__ = ["PeakMemory"]
