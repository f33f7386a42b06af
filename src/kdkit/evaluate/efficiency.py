"""Efficiency of a model: parameters, on-disk size, latency, throughput and peak memory.

Everything is measured in one call so teacher and student figures come from the same conditions.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

# Beyond this many bytes of tensor data the safetensors size is computed instead of serialized: serializing
# a multi-GB model would copy it all into host memory only to measure a length.
SERIALIZE_LIMIT_BYTES = 1 << 30
# The throughput measurement runs at least this long and this many timed batches.
MIN_THROUGHPUT_S = 0.2
MIN_THROUGHPUT_BATCHES = 2


def _sig(x: float, digits: int = 4) -> float:
    """Round to about `digits` significant digits without ever rounding the integer part (12345.6 -> 12346.0)."""
    if not math.isfinite(x) or x == 0:
        return float(x)
    return round(float(x), max(0, digits - 1 - math.floor(math.log10(abs(x)))))


def count_params(model: nn.Module) -> int:
    """All parameters, trainable or not; `parameters()` already yields a shared (tied) parameter once."""
    return sum(p.numel() for p in model.parameters())


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with tensors that share memory (tied weights) kept once, as safetensors requires."""
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            continue  # e.g. quantization metadata that is not a tensor
        t = t.detach()
        if t.numel() == 0:
            out[name] = t.cpu()
            continue
        ptr = t.untyped_storage().data_ptr()
        key = (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            continue  # the very same tensor under a second name: saved once, as save_model does
        seen[key] = name
        # Partly overlapping views of one storage can't be saved side by side; copy those.
        shared = (t.device, ptr) in storages
        storages.add((t.device, ptr))
        t = t.cpu().contiguous()
        out[name] = t.clone() if shared or t.untyped_storage().nbytes() != t.nbytes else t
    return out


def safetensors_size(model: nn.Module) -> int:
    """Bytes of the model's state dict written as a .safetensors file."""
    state = _unique_state(model)
    data = sum(t.nbytes for t in state.values())
    if data <= SERIALIZE_LIMIT_BYTES:
        return len(safetensors_save(state))
    # Large models: tensor bytes plus a header built the way safetensors builds it (JSON padded to 8 bytes);
    # exact to within the header's formatting, which is negligible at this size.
    header, offset = {}, 0
    for name, t in state.items():
        header[name] = {"dtype": str(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    n = len(json.dumps(header, separators=(",", ":")))
    return 8 + n + (-n % 8) + data


class _RssPeak:
    """Peak resident-set growth of this process while active, sampled from /proc/self/statm every ~1 ms.

    Approximate by nature: a spike shorter than the sampling period can be missed, memory the allocator keeps
    from earlier work isn't counted again, and other threads' allocations are counted. Without /proc (macOS)
    it falls back to the growth of getrusage's lifetime maximum, which is 0 when the old peak wasn't exceeded.
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.proc = os.path.exists("/proc/self/statm")
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    @staticmethod
    def _maxrss() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, kilobytes on Linux

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RssPeak":
        if self.proc:
            self.start = self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.start = self._maxrss()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:
            self.peak = self._maxrss()

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak - self.start)


def _infer_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def measure_efficiency(model: nn.Module, example: Tensor, *, batch_size: int, repeats: int = 30, warmup: int = 3,
                       device: Any = None) -> dict:
    """Measure {"params", "size_mb", "latency_ms", "throughput", "peak_mem_mb"} of `model`.

    `example` is one input of batch size 1 (only its first sample is used). The model is not moved: inputs go
    to `device`, or to the device of the model's first parameter. latency_ms is the median of `repeats` timed
    single-sample forwards after `warmup` untimed ones; throughput is samples/s at `batch_size` (the example
    repeated) over at least MIN_THROUGHPUT_S of work. peak_mem_mb covers the throughput measurement: on CUDA
    the device's peak allocated memory (weights included, as the contract says) in MiB; on CPU the process's
    peak resident growth, which is approximate (see _RssPeak). The model's train/eval modes are restored.
    """
    device = torch.device(device) if device is not None else _infer_device(model)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    params = count_params(model)
    size_mb = safetensors_size(model) / 1e6
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            one = example[:1].to(device)
            for _ in range(warmup):
                model(one)
            times = []
            for _ in range(max(1, repeats)):
                sync()
                t0 = time.perf_counter()
                model(one)
                sync()
                times.append(time.perf_counter() - t0)
            latency_ms = statistics.median(times) * 1e3

            batch = one.expand(batch_size, *one.shape[1:]).contiguous()
            del one
            gc.collect()
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats(device)
                # Other models of the run may sit on the same device: count only this model's weights and the
                # memory its forward passes take, not what was allocated before by anything else.
                storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                            for t in model.state_dict().values() if isinstance(t, Tensor) and t.is_cuda}
                own = sum(storages.values())
                others = torch.cuda.memory_allocated(device) - own
            # The untimed first batch is inside the memory window: it is where new memory is taken from the
            # system; later batches reuse what the allocator keeps, so RSS growth would otherwise read ~0.
            with _RssPeak() as rss:
                model(batch)
                sync()
                n, t0 = 0, time.perf_counter()
                while True:
                    model(batch)
                    n += 1
                    sync()
                    elapsed = time.perf_counter() - t0
                    if elapsed >= MIN_THROUGHPUT_S and n >= MIN_THROUGHPUT_BATCHES:
                        break
            throughput = n * batch_size / elapsed
            peak = torch.cuda.max_memory_allocated(device) - others if cuda else rss.growth_bytes
    finally:
        for m, training in saved:
            m.training = training
    return {"params": int(params), "size_mb": _sig(size_mb), "latency_ms": _sig(latency_ms),
            "throughput": _sig(throughput), "peak_mem_mb": _sig(peak / 2**20)}
