"""The training loop on Accelerate: accumulation, mixed precision, clipping, schedule, evaluation, early stopping,
checkpoints and exact resume.

Exact resume rests on three rules: the data order of an epoch is a function of (seed, epoch) and a resumed epoch
skips the batches already consumed (a streamed training set: from the stream position kept in the state); each
micro-batch's augmentation draws from its own generator seeded by (seed, epoch, step, micro-batch, rank); every
rank's global RNG (dropout) is saved with every checkpoint and restored on that rank.

Every decision that changes control flow (skip a non-finite step, stop on a signal, keep the best weights,
stop early) is taken on numbers reduced across processes, so all ranks take it at the same step.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from kdkit.config.schema import Config
from kdkit.data import make_loader, num_batches
from kdkit.data.datasets import subset
from kdkit.errors import ConfigError, UserError
from kdkit.train import checkpoint as ckpt
from kdkit.train.logging import History, Progress, make_tracker
from kdkit.train.signals import GracefulStop, Interrupted


@dataclass
class TrainResult:
    steps: int
    best: dict[str, Any] | None
    wall_s: float
    skipped_steps: int


def resume_hash(cfg: Config, teacher_fingerprint: str | None, data_fingerprint: str | None = None,
                num_processes: int = 1) -> str:
    """What a resume must not change: data (config and content), models, loss, seed and the global batch.

    The samples an optimizer step takes depend only on the global batch (batch_size x grad_accum x processes:
    see kdkit.data.loader), so a run may resume on another number of processes with the accumulation adjusted;
    it then sees the same samples per step, though not bit-identically (augmentation and dropout are per rank).
    """
    d = cfg.model_dump(mode="json")
    keep = {k: d[k] for k in ("data", "student", "distill", "seed")}
    keep["global_batch"] = cfg.train.batch_size * cfg.train.grad_accum * num_processes
    keep["teacher"] = teacher_fingerprint
    keep["data_fingerprint"] = data_fingerprint
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _augment_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, distiller, data,
                 accelerator: Accelerator, *, teacher_fingerprint: str | None = None, label: str = "train"):
        self.cfg, self.run_dir, self.distiller, self.data, self.acc = cfg, Path(run_dir), distiller, data, accelerator
        self.label = label
        self.ckpt_root = self.run_dir / "checkpoints"
        t = cfg.train
        # a streamed training set (kdkit.data.text_stream) has no length: the whole run is one epoch of max_steps
        self.streamed = getattr(data.train, "streaming", False)
        if self.streamed and t.max_steps is None:
            raise ConfigError([("train.max_steps", "data.text.streaming: a stream's length is unknown, so the run's "
                                "length is given in optimizer steps")])
        batches = (t.max_steps * t.grad_accum if self.streamed
                   else num_batches(len(data.train), t.batch_size, accelerator.num_processes, True))
        self.steps_per_epoch = batches // t.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size x train.grad_accum x processes ({t.batch_size} x {t.grad_accum} x "
                            f"{accelerator.num_processes}) is larger than the {len(data.train)} training samples")
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.config_hash = resume_hash(cfg, teacher_fingerprint, data.fingerprint, accelerator.num_processes)
        self.teacher_fingerprint = teacher_fingerprint

        # A distiller may train more than its student (feature projectors): `trainable` is then the module to prepare,
        # holding the student as `.student`, and `param_groups(lr)` its optimizer groups. Checkpoints hold all of it;
        # evaluation and export see the student alone (`self.student`).
        trainable = getattr(distiller, "trainable", distiller.student)
        self._wrapped = trainable is not distiller.student
        groups = (distiller.param_groups(t.lr) if hasattr(distiller, "param_groups")
                  else [{"params": [p for p in trainable.parameters() if p.requires_grad]}])
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas)
        warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * self.total_steps)
        try:
            # Not prepared: Accelerate would step it once per process; we step it once per optimizer step.
            self.scheduler = get_scheduler(t.scheduler, self.optimizer, num_warmup_steps=warmup,
                                           num_training_steps=self.total_steps)
        except (ValueError, KeyError) as err:
            raise UserError(f"train.scheduler: {err}") from None
        self.model, self.optimizer = accelerator.prepare(trainable, self.optimizer)
        self.stop_signal = 0  # set by _step when any rank received SIGINT/SIGTERM
        self.state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_metric": None, "best_step": None,
                      "evals_since_best": 0, "consecutive_skips": 0, "skipped_steps": 0, "elapsed_s": 0.0,
                      "stopped_early": False, "log_sums": {}, "log_count": 0}

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"step": self.state["global_step"], "config_hash": self.config_hash,
                "teacher_fingerprint": self.teacher_fingerprint}

    def save(self) -> Path:
        """Checkpoint the current step (every rank must call it: states are gathered to the main process)."""
        from accelerate.utils import gather_object

        rng = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        ranks = gather_object([rng])  # one entry per process, in rank order
        model_state = self.acc.get_state_dict(self.model)  # a collective under FSDP / DeepSpeed
        path = self.ckpt_root / f"{ckpt.PREFIX}{self.state['global_step']:07d}"
        if self.acc.is_main_process:
            ckpt.write_checkpoint(
                path, model_state=model_state,
                objects={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "rng": {"ranks": ranks}},
                state=self.state, meta=self._meta(), run_dir=self.run_dir)
            ckpt.prune(self.ckpt_root, self.cfg.train.keep_last, self.run_dir)
        self.acc.wait_for_everyone()
        return path

    def _save_best(self) -> None:
        model_state = self.acc.get_state_dict(self.model)
        if self.acc.is_main_process:
            ckpt.write_checkpoint(self.ckpt_root / "best", model_state=model_state,
                                  objects={}, state=self.state, meta=self._meta(), run_dir=self.run_dir)
        self.acc.wait_for_everyone()

    def resume(self, path: Path | None, force: bool = False) -> bool:
        """Restore the newest complete checkpoint (or `path`); False when there is none."""
        if path is None:
            found = ckpt.latest_complete(self.ckpt_root)
            if found is None:
                return False
            path, manifest = found
        else:
            manifest = ckpt.verify(path)
            if manifest is None:
                raise UserError(f"--resume: {path} is not a complete checkpoint (manifest missing or files corrupt)")
        if manifest.get("config_hash") != self.config_hash and not force:
            raise UserError(f"--resume: {path} was written with other data, models, loss, seed or global batch; "
                            "start a new output_dir, or pass --force to resume anyway")
        model_state, objects, state = ckpt.load_checkpoint(path)
        self.acc.unwrap_model(self.model).load_state_dict(model_state)
        self.optimizer.load_state_dict(objects["optimizer"])
        self.scheduler.load_state_dict(objects["scheduler"])
        ranks = objects["rng"].get("ranks", [objects["rng"]])  # checkpoints of kdkit 0.1.0 held one process's state
        if len(ranks) != self.acc.num_processes:
            self.acc.print(f"note: the checkpoint has RNG states of {len(ranks)} processes, this run has "
                           f"{self.acc.num_processes}: dropout will not repeat the original run's")
        rng = ranks[self.acc.process_index % len(ranks)]
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(json.loads(rng["python"])))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.state.update(state)
        self.acc.print(f"resumed from {path} at step {self.state['global_step']}")
        return True

    # -- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any] | None:
        if self.data.val is None or len(self.data.val) == 0:
            return None
        model = self.student
        was_training = model.training
        model.eval()
        # each process evaluates a disjoint shard (no padding, so no sample counts twice); the totals are summed
        shard = subset(self.data.val, torch.arange(self.acc.process_index, len(self.data.val), self.acc.num_processes))
        loader = make_loader(shard, batch_size=self.cfg.eval.batch_size, shuffle=False, seed=self.cfg.seed)
        with self.acc.autocast():
            metrics = self.distiller.validate(model, loader, self.acc.device,
                                              lambda totals: self.acc.reduce(totals, reduction="sum"))
        model.train(was_training)
        return metrics

    # -- the loop ----------------------------------------------------------------------------------------------
    def fit(self, *, resume: bool | Path = False, force: bool = False) -> TrainResult:
        t, acc, s = self.cfg.train, self.acc, self.state
        if resume:
            self.resume(None if resume is True else Path(resume), force=force)
        history = History(self.run_dir / "history.jsonl", enabled=acc.is_main_process, truncate_after=s["global_step"])
        tracker = make_tracker(t.tracker if acc.is_main_process else "none", self.run_dir / "tensorboard",
                               purge_step=s["global_step"] + 1 if resume else None)
        progress = Progress(self.label, self.total_steps, s["global_step"], enabled=t.progress and acc.is_main_process,
                            quiet=not acc.is_main_process)
        self.progress = progress
        try:
            with GracefulStop() as signals:
                self._loop(history, tracker, progress, signals)
        finally:
            progress.close()
            tracker.close()
        self._load_export_weights()
        best = None if s["best_step"] is None else {"step": s["best_step"], self.distiller.best_metric[0]: s["best_metric"]}
        return TrainResult(steps=s["global_step"], best=best, wall_s=s["elapsed_s"], skipped_steps=s["skipped_steps"])

    def _loop(self, history: History, tracker, progress: Progress, signals: GracefulStop) -> None:
        cfg, t, acc, s = self.cfg, self.cfg.train, self.acc, self.state
        self.model.train()
        start, elapsed0 = time.perf_counter(), s["elapsed_s"]
        # the running means of the next history line live in the state, so a resumed run logs the same numbers
        sums: dict[str, float] = s["log_sums"]
        stop = s["stopped_early"]
        while s["global_step"] < self.total_steps and not stop:
            if self.streamed:  # continues at the stream position kept in the state (the start, on a new run)
                loader = self.data.train.batches(t.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                                                 position=s.get("stream"))
            else:
                loader = make_loader(self.data.train, batch_size=t.batch_size, shuffle=True, seed=cfg.seed,
                                     epoch=s["epoch"], rank=acc.process_index, world_size=acc.num_processes,
                                     skip_batches=s["step_in_epoch"] * t.grad_accum, drop_last=True,
                                     num_workers=cfg.data.num_workers)
            getattr(self.distiller, "set_epoch", lambda epoch: None)(s["epoch"])  # e.g. a cached teacher's view
            batches = iter(loader)
            while s["step_in_epoch"] < self.steps_per_epoch and s["global_step"] < self.total_steps:
                parts = self._step([next(batches) for _ in range(t.grad_accum)], signals.requested())
                s["step_in_epoch"] += 1
                if self.streamed:
                    s["stream"] = loader.position  # saved with every checkpoint: a resume skips what was consumed
                s["elapsed_s"] = elapsed0 + time.perf_counter() - start
                if parts is None:
                    history.write({"kind": "skip", "step": s["global_step"], "reason": "non-finite loss or gradient"})
                    if s["consecutive_skips"] >= t.max_consecutive_skips:
                        raise UserError(f"{s['consecutive_skips']} consecutive steps had a non-finite loss or gradient "
                                        f"(train.max_consecutive_skips); lower train.lr, set train.max_grad_norm, or "
                                        "use train.precision=fp32")
                    self._stop_if_signalled()
                    continue
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                s["log_count"] += 1
                step = s["global_step"]
                if step % t.log_every == 0 or step == self.total_steps:
                    line = {"kind": "train", "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                            "lr": self.scheduler.get_last_lr()[0], **{k: v / s["log_count"] for k, v in sums.items()},
                            "time_s": round(s["elapsed_s"], 3)}
                    history.write(line)
                    tracker.log({f"train/{k}": v for k, v in line.items() if k not in ("kind", "step")}, step)
                    sums.clear()
                    s["log_count"] = 0
                progress.update(step, parts["loss"])
                end_of_epoch = s["step_in_epoch"] == self.steps_per_epoch
                last = step == self.total_steps
                if (t.eval_every == "epoch" and end_of_epoch) or (isinstance(t.eval_every, int) and step % t.eval_every == 0) or last:
                    stop = self._eval_and_track(history, tracker) or stop
                    s["stopped_early"] = stop
                if (t.save_every == "epoch" and end_of_epoch) or (isinstance(t.save_every, int) and step % t.save_every == 0):
                    if not last:
                        self.save()
                self._stop_if_signalled()  # after the step's logging, evaluation and saving: a resume repeats none
                if stop:
                    break
            if s["step_in_epoch"] >= self.steps_per_epoch:
                s["epoch"] += 1
                s["step_in_epoch"] = 0
        s["elapsed_s"] = elapsed0 + time.perf_counter() - start
        self.save()

    def _micro_weights(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[float] | None:
        """Per-micro-batch loss weights making the step's loss a mean over every loss unit (token) of the global
        batch, whatever the split into micro-batches and processes; None for equal weights (1 / grad_accum).

        A distiller whose losses are means over a varying number of units (tokens) gives `loss_units(batch)`;
        DDP then averages gradients over processes, hence the factor of num_processes."""
        units = getattr(self.distiller, "loss_units", None)
        if units is None:
            return None
        counts = [float(units(b)) for b in micro_batches]
        total = float(self.acc.reduce(torch.tensor(sum(counts), device=self.acc.device), reduction="sum"))
        return [c * self.acc.num_processes / max(total, 1.0) for c in counts]

    def _stop_if_signalled(self) -> None:
        if self.stop_signal:
            path = self.save()
            raise Interrupted(self.stop_signal, self.state["global_step"], str(path))

    def _step(self, micro_batches: list[dict[str, torch.Tensor]], signal_received: int = 0) -> dict[str, float] | None:
        """One optimizer step over `grad_accum` micro-batches; None when it was skipped for non-finite numbers.

        Sets `self.stop_signal` when this or any other rank has received a signal (`signal_received`)."""
        cfg, acc, s = self.cfg, self.acc, self.state
        n = len(micro_batches)
        weights = self._micro_weights(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            gen = torch.Generator().manual_seed(
                _augment_seed(cfg.seed, s["epoch"], s["step_in_epoch"], i, acc.process_index))
            batch = self.distiller.prepare_batch(batch, gen)
            sync = nullcontext() if i == n - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                out = self.distiller.step(batch, student=self.model)
            if weights is None:
                acc.backward(out["loss"] / n)
            else:
                acc.backward(out["loss"] * weights[i])
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() * (1 / n if weights is None else weights[i])
        # one reduction for the logged losses and the stop flag: the same numbers, hence decisions, on every rank
        flag = torch.tensor(float(signal_received), device=acc.device)
        stacked = acc.reduce(torch.stack([*totals.values(), flag]), reduction="mean")
        stacked, others_signal = stacked[:-1], float(stacked[-1])
        self.stop_signal = signal_received or (15 if others_signal > 0 else 0)
        ok = bool(torch.isfinite(stacked).all())
        if acc.scaler is not None:
            # fp16: the grad scaler unscales once (in clipping) and must then see optimizer.step(), which it skips
            # by itself on inf/NaN gradients while lowering the scale; ask it afterwards whether it stepped.
            if cfg.train.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
            self.optimizer.step()
            ok = ok and not acc.optimizer_step_was_skipped
        elif ok:
            # the total norm of the synchronised gradients (clipped when asked): a non-finite gradient skips the step
            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm or float("inf"))
            ok = bool(torch.isfinite(torch.as_tensor(norm)).all())
            if ok:
                self.optimizer.step()
        if ok:
            self.scheduler.step()
            s["global_step"] += 1
            s["consecutive_skips"] = 0
        else:  # the optimizer, the schedule and the step counter do not advance
            s["consecutive_skips"] += 1
            s["skipped_steps"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        return dict(zip(totals, stacked.tolist())) if ok else None

    def _eval_and_track(self, history: History, tracker) -> bool:
        """Evaluate, keep the best weights, and say whether early stopping asks to stop."""
        s, t = self.state, self.cfg.train
        metrics = self.evaluate()
        if metrics is None:
            return False
        step = s["global_step"]
        epoch = round(step / self.steps_per_epoch, 4)
        history.write({"kind": "eval", "step": step, "epoch": epoch, **metrics})
        name, mode = self.distiller.best_metric
        value = metrics[name]
        self.progress.log(f"{self.label}: step {step} (epoch {epoch:g}) validation {name} {value:.4g}, "
                          f"loss {metrics['loss']:.4f}")
        tracker.log({f"val/{k}": v for k, v in metrics.items()}, step)
        better = s["best_metric"] is None or (value > s["best_metric"] if mode == "max" else value < s["best_metric"])
        if better:
            s["best_metric"], s["best_step"], s["evals_since_best"] = value, step, 0
            self._save_best()
            return False
        s["evals_since_best"] += 1
        if t.early_stopping_patience is not None and s["evals_since_best"] >= t.early_stopping_patience:
            self.acc.print(f"early stopping at step {step}: no improvement in {s['evals_since_best']} evaluations")
            return True
        return False

    def _load_export_weights(self) -> None:
        best = self.ckpt_root / "best"
        if self.cfg.train.export == "best" and ckpt.recover(best) is not None:
            state, _, _ = ckpt.load_checkpoint(best)
            self.acc.unwrap_model(self.model).load_state_dict(state)

    @property
    def student(self):
        model = self.acc.unwrap_model(self.model)
        return model.student if self._wrapped else model


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, list) else x
