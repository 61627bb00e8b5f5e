"""A training run: set-up and resume, epochs of optimiser steps, held-out evaluation and checkpoints.

`Trainer(args, ctx)` sets everything up from the parsed `vivit-train` arguments (data, model,
optimiser, schedule; the state of a checkpoint when resuming); `run()` trains to the last step
and returns the summary. One process, or one of many under torchrun (DDP or FSDP): every
process runs the same steps on its shard of each global batch; only the main process writes.

Long runs (docs/training.md, "Long runs"): after each step's backward the processes agree, in one
all-reduce, on its loss, whether its gradients are finite, whether a stop signal arrived and
whether --checkpoint-minutes is due, so all of them skip, stop or checkpoint at the same step.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..checkpoint import checkpoint_config, rng_state, save_checkpoint, set_rng_state
from ..cli.common import DIVERGED, INPUT, WRITE_FAILED, UserError
from ..config import ViViTConfig
from ..data import ShardedSampler
from ..model import build_model
from ..planning import MemoryPlanError, apply_plan, plan_for_run
from .arguments import check_args, fill_defaults, spec_from_args
from .datasets import build_datasets, make_loader
from .evaluation import autocast, evaluate
from .losses import classification_loss
from .metrics import (
    Metrics,
    epoch_record,
    format_summary,
    memory_mb,
    progress_bar,
    show_on_progress,
    to_json,
    zero_epoch,
    zero_window,
)
from .optim import make_optimizer, make_scheduler, seed_everything
from .start import check_resume, check_video_pretrained, load_pretrained, read_pretrained, read_resume
from .stopping import StopSignals


class Trainer:
    """One training run as the `vivit-train` arguments say (see `run`)."""

    def __init__(self, args: argparse.Namespace, ctx: distributed.Context) -> None:
        fill_defaults(args)
        check_args(args, ctx)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args, self.ctx = args, ctx
        self.out_dir = Path(args.output_dir)
        self.metrics = Metrics(self.out_dir / "metrics.jsonl" if ctx.is_main else None)
        self.ckpt_path = self.out_dir / "checkpoint.pt"

        self.train_set, self.val_set, self.classes = build_datasets(args)  # a bad CSV fails here, before any step
        resume_state, pretrained, pretrained_config = self._read_start()
        if ctx.is_main:
            self._make_output_dir()
        self.model = self._build_model(pretrained, pretrained_config)
        self.optimizer = make_optimizer(args, self.model)
        self._plan_steps()
        self.scheduler = make_scheduler(args, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16")
        self.step = 0
        # (path, step) of the newest checkpoint of this run on disk: never one with non-finite values.
        self.last_checkpoint: tuple[Path, int] | None = None
        self._resume_or_seed(resume_state)

        self.signals = StopSignals()
        self.stopped_by: str | None = None
        self.checkpoint_due = False
        self.last_checkpoint_time = time.monotonic()
        # Steps skipped for a non-finite loss or gradients: in a row, in all; steps the fp16 scaler skipped.
        self.bad_in_a_row = self.bad_steps = self.scaler_skipped = 0

        self.progress = None
        self.skipped_total, self.warned = 0, set()
        # Clips decoded and skipped by this process, until some clip anywhere was read: a run in
        # which no video decodes must fail before it writes a checkpoint.
        self.clips_read = self.clips_skipped = 0
        self.readable_seen, self.first_unreadable = False, None
        self.run_clips = 0.0
        self.last_eval: dict[str, float] | None = None

    # ------------------------------------------------------------------------- set-up

    def _read_start(self) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None, ViViTConfig | None]:
        """Read the checkpoint the run resumes, or else the --pretrained weights, and check them
        against the arguments before any model is built; sets `resume_path` and `spec`.
        Returns (resume state, pretrained weights, the config of a pretrained video model)."""
        args = self.args
        self.resume_path, state = read_resume(args.resume, self.ckpt_path)
        pretrained, pretrained_config = read_pretrained(args.pretrained) if state is None else (None, None)
        inherit = checkpoint_config(state, self.resume_path) if state is not None else pretrained_config
        if pretrained_config is not None:
            check_video_pretrained(args, self.classes, pretrained_config)
        self.spec = spec_from_args(args, len(self.classes), inherit)
        if state is not None:
            check_resume(args, self.resume_path, state, self.classes, self.spec)
        return state, pretrained, pretrained_config

    def _make_output_dir(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--output-dir {self.args.output_dir}: cannot create it ({error.strerror})") from None
        if not os.access(self.out_dir, os.W_OK | os.X_OK):
            raise UserError(f"--output-dir {self.args.output_dir}: not writable")

    def _build_model(self, pretrained: dict[str, torch.Tensor] | None, video: ViViTConfig | None) -> torch.nn.Module:
        args, ctx = self.args, self.ctx
        seed_everything(args.seed)  # the same initial weights on every process
        model = build_model(self.spec)
        if pretrained is not None:
            load_pretrained(model, args, pretrained, video, announce=ctx.is_main)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if getattr(args, "memory_budget", None) is not None:
            self._fit_memory_budget(model)
        model.to(ctx.device)
        return distributed.wrap(model, ctx, "fsdp" if args.fsdp else "ddp")

    def _fit_memory_budget(self, model: torch.nn.Module) -> None:
        """--memory-budget: the blocks' policies and the micro-batches of the plan that fits, printed
        and written to memory_plan.json; one line (exit status 1) when nothing fits."""
        args, ctx = self.args, self.ctx
        try:
            plan = plan_for_run(args, model.config, ctx.device, ctx.world_size, write=ctx.is_main)
        except MemoryPlanError as error:
            raise UserError(f"--memory-budget: {error}", INPUT) from None
        apply_plan(plan, model, args)  # sets args.accum_steps before _plan_steps reads it
        if ctx.is_main:
            print(plan.describe(), flush=True)

    def _plan_steps(self) -> None:
        """The sampler, the batch each process takes per micro-step, and the steps of an epoch and of the run."""
        args, ctx = self.args, self.ctx
        # Clips per process per micro-step; the sampler shards each global batch over processes.
        self.micro = args.batch_size // (ctx.world_size * args.accum_steps)
        self.sampler = ShardedSampler(
            len(self.train_set), shuffle=True, seed=args.seed, rank=ctx.rank, world_size=ctx.world_size
        )
        self.items_per_step = self.micro * args.accum_steps  # per process
        self.steps_per_epoch = self.sampler.per_rank // self.items_per_step
        if self.steps_per_epoch < 1:
            raise UserError(
                f"--batch-size {args.batch_size}: the {len(self.train_set)} training clips do not fill one batch"
            )
        self.total_steps = args.steps or max(1, round(args.epochs * self.steps_per_epoch))
        self.stop = min(self.total_steps, args.stop_at) if args.stop_at else self.total_steps

    def _resume_or_seed(self, state: dict[str, Any] | None) -> None:
        """Continue from --resume's checkpoint `state` (model, optimiser, schedule, scaler, step, RNG
        states), or start fresh with per-process seeds for dropout, drop-path and mixup."""
        args, ctx = self.args, self.ctx
        if state is None:
            if ctx.is_main and self.metrics.path.exists():
                self.metrics.path.unlink()  # a fresh run starts a fresh record
            seed_everything(args.seed + ctx.rank)
            return
        distributed.load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"], ctx)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.last_checkpoint = (Path(self.resume_path), self.step)
        rngs = state["rng"]
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        if ctx.is_main:
            self.metrics.keep_until(self.step, self.steps_per_epoch)  # the steps after it are run again
            print(f"resumed from {self.resume_path} at step {self.step}", file=sys.stderr)

    # ------------------------------------------------------------------------- steps and epochs

    def run(self) -> dict[str, Any]:
        """Train from the current step to the last (or --stop-at), then checkpoint, evaluate and
        summarise; returns the summary (also written to summary.json)."""
        if self.ctx.is_main and not self.args.no_progress:
            self.progress = progress_bar(self.total_steps, self.step)
        self.model.train()
        run_start = time.perf_counter()
        # Clips and losses since the last metrics record (which may lie in the previous epoch).
        self.window, self.window_start = zero_window(), run_start
        with self.signals:  # to the end of the final checkpoint: a signal during it changes nothing
            try:
                while self.step < self.stop:
                    self.run_epoch()
            finally:
                if self.progress is not None:
                    self.progress.close()
            return self.finish(time.perf_counter() - run_start)

    def run_epoch(self) -> None:
        """The steps of the current epoch from the current position (to its end or --stop-at)."""
        args = self.args
        epoch, position = divmod(self.step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch, position * self.items_per_step)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        batches = iter(make_loader(self.train_set, self.micro, self.sampler, args.workers, args.seed + epoch))
        totals = zero_epoch()
        while position < self.steps_per_epoch and self.step < self.stop:
            self.train_step(batches, totals)
            self.step += 1
            position += 1
            if self.stopped_by is not None and self.step < self.stop:
                self.stop = self.step  # `finish` checkpoints this step
            self.log(epoch, totals)
            if self.progress is not None:
                self.progress.update(1)
            self.evaluate_and_checkpoint()
        self.end_epoch(epoch, totals)

    def train_step(self, batches, totals: dict[str, float]) -> None:
        """One optimiser step over --accum-steps micro-batches. Adds the step's seconds and those
        spent waiting for batches to the window (the progress line's data-wait fraction)."""
        args = self.args
        step_start = time.perf_counter()
        waited = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        loss_sum = count = 0.0
        for micro_step in range(args.accum_steps):
            wait_start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - wait_start
            self._note_skipped(batch, totals)
            sync = micro_step == args.accum_steps - 1 or not ddp  # DDP all-reduces on the last micro-step only
            with nullcontext() if sync else self.model.no_sync():
                micro_loss, n = self._micro_step(batch)
            loss_sum, count = loss_sum + micro_loss, count + n
        if self._agree(loss_sum, count):
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if scale is not None and self.scaler.get_scale() < scale:
                self.scaler_skipped += 1  # inf/NaN gradients: the scaler skipped the step and lowered its scale
        self.scheduler.step()
        self.window["data_s"] = self.window.get("data_s", 0.0) + waited
        self.window["step_s"] = self.window.get("step_s", 0.0) + time.perf_counter() - step_start

    def _agree(self, loss_sum: float, count: float) -> bool:
        """After a step's backward, what every process must agree on, in one all-reduce: the
        step's loss, whether its gradients are finite, whether a stop signal arrived (the run
        stops after this step) and whether --checkpoint-minutes is due (rank 0's clock decides).
        Returns whether to take the optimiser step; raises UserError (DIVERGED) when
        --max-bad-steps is exceeded."""
        args, ctx = self.args, self.ctx
        grads_bad = 0.0
        if not self.scaler.is_enabled():  # with fp16 the scaler finds inf/NaN gradients itself
            grads = [(name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
            grads_bad = float(distributed.first_nonfinite(grads) is not None)
        minutes = args.checkpoint_minutes
        due = ctx.is_main and minutes is not None and time.monotonic() - self.last_checkpoint_time >= 60 * minutes
        stop = self.signals.received is not None
        loss_sum, count, grads_bad, due, stop = distributed.all_reduce_sum(
            [loss_sum, count, grads_bad, float(due), float(stop)], ctx
        )
        self.checkpoint_due = due > 0
        if stop and self.stopped_by is None:
            self.stopped_by = self.signals.received or "a signal to another process"
        loss = loss_sum / max(count, 1)
        if math.isfinite(loss) and not grads_bad:
            self.bad_in_a_row = 0
            return True
        self.bad_in_a_row += 1
        self.bad_steps += 1
        if self.bad_in_a_row > args.max_bad_steps:
            raise self._diverged(loss)
        return False

    def _diverged(self, loss: float) -> UserError:
        if math.isfinite(loss):
            what = f"the gradients are not finite (loss {loss:.6g})"
        else:
            what = f"the loss is {loss:.6g}"
        if self.args.max_bad_steps:
            what = (
                f"{self.bad_in_a_row} steps in a row with a non-finite loss or gradients "
                f"(--max-bad-steps {self.args.max_bad_steps}); at the last, {what}"
            )
        return UserError(
            f"step {self.step + 1}: {what}; stopped before its optimiser step. {self._last_good()}",
            DIVERGED,
            show=self.ctx.is_main,
        )

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint was written"
        path, step = self.last_checkpoint
        return f"Last checkpoint (finite weights): {path} (step {step})"

    def _micro_step(self, batch: dict) -> tuple[float, int]:
        """Forward and backward of one micro-batch; returns (the sum of its clips' losses, clips)."""
        args, device = self.args, self.ctx.device
        if batch["video"] is None:
            # Every clip of this micro-batch was unreadable: a forward and backward of a blank
            # clip with zero weight keeps the processes' collectives in step.
            blank = torch.zeros(1, 3, args.num_frames, args.img_size, args.img_size, device=device)
            with autocast(device, args.precision):
                loss = self.model(blank).float().sum() * 0.0
            self.scaler.scale(loss).backward()
            return 0.0, 0
        video = batch["video"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast(device, args.precision):
            loss, logits = classification_loss(
                self.model, video, labels, len(self.classes), mixup_alpha=args.mixup, smoothing=args.label_smoothing
            )
        self.scaler.scale(loss / args.accum_steps).backward()
        n = labels.shape[0]
        self.clips_read += n
        loss_sum = loss.item() * n
        self.window["loss"] += loss_sum
        self.window["correct"] += (logits.argmax(-1) == labels).sum().item()
        self.window["count"] += n
        return loss_sum, n

    def _note_skipped(self, batch: dict, totals: dict[str, float]) -> None:
        for path, reason in batch["skipped"]:
            totals["skipped"] += 1
            self.clips_skipped += 1
            if not self.warned:
                self.first_unreadable = f"{path}: {reason}"
            if path not in self.warned:
                self.warned.add(path)
                warnings.warn(f"skipping unreadable video {path} ({reason})", stacklevel=1)

    def log(self, epoch: int, totals: dict[str, float]) -> None:
        """Every --log-every steps (and at the last): a metrics record, and the window summed over
        processes into the epoch's totals; the progress bar every step."""
        ctx, window = self.ctx, self.window
        log_now = self.step % self.args.log_every == 0 or self.step == self.stop
        if not log_now and self.progress is None:
            return
        sums = [
            window["loss"],
            window["correct"],
            window["count"],
            window.get("data_s", 0.0),
            window.get("step_s", 0.0),
        ]
        loss_sum, correct, count, data_s, step_s = distributed.all_reduce_sum(sums, ctx) if log_now else sums
        now = time.perf_counter()
        clips_per_s = count * (ctx.world_size if not log_now else 1) / max(now - self.window_start, 1e-9)
        # Near 1, the steps wait on the loader (more --workers, or a faster decode, would help).
        data_wait = data_s / step_s if step_s > 0 else 0.0
        record = {
            "step": self.step,
            "epoch": epoch,
            "loss": loss_sum / max(count, 1),
            "acc": correct / max(count, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "clips_per_s": clips_per_s,
            "memory_mb": memory_mb(ctx.device),
            "data_wait_fraction": data_wait,
        }
        if self.progress is not None:
            show_on_progress(self.progress, record)
        if not log_now:
            return
        self.metrics.write(record)
        for key, value in (("loss", loss_sum), ("correct", correct), ("count", count)):
            totals[key] += value
        self.run_clips += count
        self.window, self.window_start = zero_window(), now

    def end_epoch(self, epoch: int, totals: dict[str, float]) -> None:
        """The epoch's record (also when --stop-at ends it early)."""
        self._check_readable()
        skipped = int(distributed.all_reduce_sum([totals["skipped"]], self.ctx)[0])
        self.skipped_total += skipped
        summary = epoch_record(epoch, self.step, skipped, totals)
        self.metrics.write(summary)
        if self.ctx.is_main:
            message = (
                f"epoch {epoch}: step {self.step}, loss {summary['loss']:.4f}, acc {summary['acc']:.3f}, "
                f"{skipped} unreadable video(s) skipped"
            )
            (self.progress.write if self.progress is not None else print)(message)

    # ------------------------------------------------------------------------- evaluation and checkpoints

    def evaluate_and_checkpoint(self) -> None:
        """After a step: a checkpoint every --checkpoint-every steps or when --checkpoint-minutes
        is due, an evaluation every --eval-every (the last step's are left to `finish`)."""
        args = self.args
        # The evaluation first: its data loader draws from the global RNG, and a run resumed from
        # this step's checkpoint must continue from the state after that draw.
        if args.eval_every and self.step % args.eval_every == 0 and self.step < self.total_steps:
            self.last_eval = self.held_out()
            self.model.train()
        every = args.checkpoint_every and self.step % args.checkpoint_every == 0
        if (every or self.checkpoint_due) and self.step < self.stop:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Everything the run needs to continue bit for bit. Collective: every process calls it.

        Raises UserError: DIVERGED when a weight or optimiser state is not finite (nothing is
        written), WRITE_FAILED when the file cannot be written (the previous one is kept)."""
        ctx = self.ctx
        self._check_readable()
        self._check_finite()
        model_state, optim_state = distributed.full_state_dicts(self.model, self.optimizer, ctx)
        rngs = [rng_state()]
        if ctx.distributed:
            rngs = [None] * ctx.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        error, before = None, _identity(self.ckpt_path)
        if ctx.is_main:
            try:
                self._save(model_state, optim_state, rngs)
            except OSError as failure:
                error = failure
        # Every process stops when the write failed: a peer left waiting in the next collective would hang.
        if distributed.all_reduce_sum([float(error is not None)], ctx)[0]:
            raise self._write_failed(error, before)
        self.last_checkpoint = (self.ckpt_path, self.step)
        self.last_checkpoint_time = time.monotonic()

    def _check_finite(self) -> None:
        """UserError (DIVERGED) when a parameter or optimiser state on any process holds a NaN or inf."""
        tensors = list(distributed.unwrap(self.model).named_parameters())
        names = {id(p): name for name, p in tensors}
        for param, state in self.optimizer.state.items():
            tensors += [(f"the optimiser's {key} of {names.get(id(param), '?')}", v) for key, v in state.items()]
        bad = distributed.first_nonfinite(tensors)
        if distributed.all_reduce_sum([float(bad is not None)], self.ctx)[0]:
            where = bad or "a tensor of another process"
            raise UserError(
                f"step {self.step}: {where} is not finite; no checkpoint written. {self._last_good()}",
                DIVERGED,
                show=self.ctx.is_main,
            )

    def _write_failed(self, error: OSError | None, before: tuple[int, int] | None) -> UserError:
        if error is None:
            return UserError("the main process could not write the checkpoint", WRITE_FAILED, show=False)
        name = errno.errorcode.get(error.errno or 0)
        cause = f"{error.strerror or error}" + (f" ({name})" if name else "")
        if _identity(self.ckpt_path) != before:  # the rename was done, the directory's sync failed
            kept = f"the step-{self.step} checkpoint is in place but may not survive a power cut"
        elif before is None:
            kept = "there was no previous checkpoint"
        else:
            kept = "the previous checkpoint there is unchanged"
            if self.last_checkpoint is not None:
                kept += f" (step {self.last_checkpoint[1]})"
        return UserError(
            f"{self.ckpt_path}: writing the step-{self.step} checkpoint failed: {cause}; {kept}; stopped",
            WRITE_FAILED,
        )

    def _save(self, model_state: dict, optim_state: dict, rngs: list) -> None:
        args = self.args
        save_checkpoint(
            {
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "step": self.step,
                "model_spec": self.spec,
                "classes": self.classes,
                "data": {
                    "num_frames": args.num_frames,
                    "img_size": args.img_size,
                    "mean": list(args.mean),
                    "std": list(args.std),
                },
                "args": vars(args),
                "world_size": self.ctx.world_size,
            },
            self.ckpt_path,
        )

    def _check_readable(self) -> None:
        """UserError when every training clip tried so far, on every process, was unreadable.
        Collective until some clip has been read."""
        if self.readable_seen:
            return
        read, skipped = distributed.all_reduce_sum([self.clips_read, self.clips_skipped], self.ctx)
        if read:
            self.readable_seen = True
        elif skipped:
            first = f" (first: {self.first_unreadable})" if self.first_unreadable else ""
            raise UserError(
                f"--train-csv {self.args.train_csv}: none of the {int(skipped)} training videos tried "
                f"could be decoded{first}; nothing was trained and no checkpoint written",
                INPUT,
            )

    def held_out(self) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        result = evaluate(
            self.model,
            self.val_set,
            self.ctx,
            batch_size=max(1, self.micro),
            precision=self.args.precision,
            workers=self.args.workers,
        )
        if not result["clips"] and result["skipped"]:
            raise UserError(
                f"--val-csv {self.args.val_csv}: none of its {int(result['skipped'])} videos could be "
                "decoded (each is named in a warning above)",
                INPUT,
            )
        self.metrics.write({"event": "eval", "step": self.step, **result})
        return result

    def finish(self, elapsed: float) -> dict[str, Any]:
        """The final checkpoint, the held-out evaluation of a finished run, and the run's summary."""
        ctx = self.ctx
        self.checkpoint()
        finished = self.step >= self.total_steps
        if finished:
            self.last_eval = self.held_out()
        divergence = distributed.max_param_divergence(self.model, ctx)
        summary = {
            "event": "summary",
            "steps": self.step,
            "total_steps": self.total_steps,
            "finished": finished,
            "stopped_by": None if finished else self.stopped_by,
            "bad_steps": self.bad_steps,
            "scaler_skipped_steps": self.scaler_skipped,
            "world_size": ctx.world_size,
            "seconds": elapsed,
            "clips_per_s": self.run_clips / max(elapsed, 1e-9),
            "memory_mb": memory_mb(ctx.device),
            "skipped_videos": self.skipped_total,
            "max_param_divergence_across_ranks": divergence,
            "checkpoint": str(self.ckpt_path),
        }
        if self.last_eval is not None:
            summary.update({f"val_{key}": value for key, value in self.last_eval.items()})
        self.metrics.write(summary)
        if ctx.is_main:
            with open(self.out_dir / "summary.json", "w") as f:
                f.write(to_json(summary, indent=2))
            print(format_summary(summary))
        return summary


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of the file at `path`, None when there is none: tells whether a save replaced it."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns
