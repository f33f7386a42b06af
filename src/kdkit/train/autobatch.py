"""`train.batch_size: auto`: the largest micro-batch that fits teacher forward plus student backward.

The global batch (`train.global_batch_size`) is what the optimisation sees, so it is kept: each process takes
global / processes samples per step, as one micro-batch when it fits or as `grad_accum` smaller ones. The
search tries the whole share first and then ever smaller divisors of it, running one real training step
(teacher forward, student forward and backward) on real samples; a step that runs out of memory is retried
smaller. It leaves no trace: gradients are dropped, normalisation statistics and RNG states restored. The
answer is written to `<run_dir>/auto_batch.json` and reused by resumes, so a resumed run keeps its data order
even when memory has changed.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Callable

import torch

from kdkit.config.schema import Config
from kdkit.errors import UserError

RECORD = "auto_batch.json"


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_fitting(share: int, fits: Callable[[int], bool]) -> int | None:
    """The largest divisor of `share` for which `fits` is true, trying from the top; None when even 1 fails."""
    for micro in divisors_descending(share):
        if fits(micro):
            return micro
    return None


def _share(cfg: Config, num_processes: int) -> int:
    total = cfg.train.global_batch_size
    if total % num_processes:
        raise UserError(f"train.global_batch_size ({total}) must be divisible by the number of processes "
                        f"({num_processes})")
    return total // num_processes


def resolve_batch_size(cfg: Config, run_dir: Path, accelerator, trial: Callable[[int], None]) -> Config:
    """`cfg` with an integer train.batch_size and train.grad_accum; unchanged unless batch_size is auto.

    `trial(micro)` runs one training step on `micro` samples (raising on out-of-memory). A record in `run_dir`
    from an earlier start with the same global batch and process count is reused without searching.
    """
    t = cfg.train
    if t.batch_size != "auto":
        return cfg
    processes = accelerator.num_processes
    share = _share(cfg, processes)
    record = Path(run_dir) / RECORD
    found = None
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("global_batch_size") == t.global_batch_size and saved.get("num_processes") == processes:
            found = int(saved["batch_size"])
            accelerator.print(f"train.batch_size auto: {found} per process (from {record})")
    if found is None:
        def fits(micro: int) -> bool:
            try:
                trial(micro)
                ok = True
            except Exception as err:  # noqa: BLE001 - only out-of-memory is an answer; anything else propagates
                if not is_out_of_memory(err):
                    raise
                ok = False
            _free_memory()
            # every process must be able to run the step: the smallest answer wins
            agreed = accelerator.reduce(torch.tensor([float(ok)], device=accelerator.device), reduction="sum")
            return int(agreed.item()) == processes

        found = largest_fitting(share, fits)
        if found is None:
            raise UserError("train.batch_size auto: not even one sample per process fits in memory with the teacher "
                            "loaded; use a smaller student or teacher, train.precision=bf16, or gradient checkpointing")
        if accelerator.is_main_process:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"batch_size": found, "grad_accum": share // found,
                                          "global_batch_size": t.global_batch_size, "num_processes": processes}) + "\n")
        accelerator.print(f"train.batch_size auto: {found} per process x {share // found} accumulation x "
                          f"{processes} processes = {t.global_batch_size} per step")
    train = t.model_copy(update={"batch_size": found, "grad_accum": share // found})
    return cfg.model_copy(update={"train": train})


def training_trial(distiller, dataset, accelerator) -> Callable[[int], None]:
    """A `trial(micro)` running one real step of `distiller` on the first `micro` training samples, leaving the
    student's weights, gradients, buffers (BatchNorm statistics) and every RNG as they were."""
    from kdkit.data import make_loader

    student = getattr(distiller, "trainable", distiller.student)  # with feature projectors, when it has them

    def trial(micro: int) -> None:
        micro_n = min(micro, len(dataset))
        batch = next(iter(make_loader(dataset, batch_size=micro_n, shuffle=False, seed=0)))
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        batch = distiller.prepare_batch(batch, torch.Generator().manual_seed(0))
        buffers = {k: v.detach().clone() for k, v in student.named_buffers()}
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        student.to(accelerator.device).train()
        try:
            with accelerator.autocast():
                out = distiller.step(batch, student=student)
            out["loss"].backward()
        finally:
            student.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in student.named_buffers():
                    v.copy_(buffers[k])
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    return trial
