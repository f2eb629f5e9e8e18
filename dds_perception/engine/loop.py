"""One training loop for every recipe: :func:`fit` runs epochs of steps, evaluates, checkpoints.

The recipes differ in what one optimizer step does (the classifier's cross-entropy step, the
detector's RPN losses, several classifiers on one batch) and in what an evaluation measures;
the loop around them is the same and lives here once:

- epochs of steps, an optional cap of steps per epoch (the step after the cap is never drawn);
- ``train`` records every ``log_every_steps`` steps (means over the window, images/s), an
  ``epoch`` record per epoch (means over the epoch, summed counts, summed over processes);
- evaluation every ``eval_every_steps`` steps, every ``eval_every_epochs`` epochs and after the
  last one (never twice at one step);
- a checkpoint after every ``checkpoint_every_epochs``-th epoch and the last one, so a killed run
  resumes exactly from its last checkpoint (a run killed mid-epoch repeats that epoch);
- a deadline: training stops at a checkpoint when the next one would come too late.

A recipe implements :class:`TrainingLoop` (what one epoch's batches are, what a step, an
evaluation and a checkpoint do, where records go) and calls :func:`fit`.
"""

from __future__ import annotations

import abc
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from dds_perception.engine.common import (
    DistributedContext,
    TrainingError,
    all_reduce_sum,
    barrier,
    close_bar,
    iter_with_progress,
)


@dataclass
class StepResult:
    """What one optimizer step reports to :func:`fit`.

    ``values`` are per-step quantities (losses), averaged over the logging window and the epoch;
    ``counts`` are summed over the epoch (correct predictions, unreadable images). Both may be
    floats or 0-d tensors: tensors are read only when a record is written, so a step on a GPU
    need not wait for the previous one.
    """

    images: int
    values: Mapping[str, float | torch.Tensor]
    counts: Mapping[str, float | torch.Tensor] = field(default_factory=dict)


class TrainingLoop(abc.ABC):
    """The recipe-specific parts :func:`fit` calls, in this order for each epoch:
    :meth:`begin_epoch`, :meth:`train_step` per batch, :meth:`learning_rate`, :meth:`end_epoch`,
    :meth:`epoch_stats`, :meth:`log` of the epoch record, :meth:`evaluate` when due,
    :meth:`save` when due. Every process calls every method (DDP collectives may be inside)."""

    @abc.abstractmethod
    def begin_epoch(self, epoch: int) -> Iterable[Any]:
        """Put the models in training mode, seed the epoch's sampling; return its batches."""

    @abc.abstractmethod
    def train_step(self, batch: Any, *, epoch: int, step: int) -> StepResult:
        """One optimizer step on ``batch``; ``step`` counts the steps done before it."""

    @abc.abstractmethod
    def learning_rate(self) -> float:
        """The learning rate of the step just done (for the records)."""

    def end_epoch(self, epoch: int) -> None:
        """Work after an epoch's last step, e.g. an epoch-wise learning-rate schedule."""
        return None

    def epoch_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Derive or rename epoch statistics (e.g. accuracy from summed counts)."""
        return stats

    def evaluate(self, epoch: int, step: int) -> dict[str, Any] | None:
        """Measure the model(s); the record returned must hold ``"step"``."""
        return None

    def save(self, *, epoch: int, step: int, last_eval: dict[str, Any] | None) -> None:
        """Write a checkpoint after ``epoch`` epochs (``step`` steps) are done."""
        return None

    def log(self, record: dict[str, Any]) -> None:
        """Write a ``train`` or ``epoch`` record (the main process writes files)."""
        return None


@dataclass
class FitOptions:
    """How :func:`fit` runs; see the module docstring."""

    epochs: int
    max_steps_per_epoch: int = 0
    eval_every_steps: int = 0
    eval_every_epochs: int = 1
    final_eval: bool = False  # evaluate after training when the last epoch did not
    log_every_steps: int = 10
    checkpoint_every_epochs: int = 1
    progress: bool = False
    deadline: float | None = None  # time.monotonic() by which fit has stopped at a checkpoint

    @classmethod
    def from_args(cls, args: Any, **changes: Any) -> FitOptions:
        """The options a command line gives (fields it has no option for keep their defaults),
        with ``changes`` on top."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **changes})


@dataclass
class FitState:
    """Where training stands: ``epoch`` epochs done after ``step`` steps."""

    epoch: int = 0
    step: int = 0
    last_eval: dict[str, Any] | None = None
    stopped: bool = False  # True when the deadline ended training before its last epoch


def _sum_into(total: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        value = value.detach() if isinstance(value, torch.Tensor) else value
        total[key] = total[key] + value if key in total else value


def _check_finite(means: Mapping[str, float], *, epoch: int, step: int) -> None:
    """Raise when a loss (a value named ``...loss``) became NaN or infinite."""
    for key, value in means.items():
        if key.endswith("loss") and not math.isfinite(value):
            raise TrainingError(
                f"{key} is {value} at epoch {epoch}, step {step}: training diverged "
                "(try a lower --lr, or --no-amp)"
            )


def _train_epoch(
    loop: TrainingLoop,
    batches: Iterable[Any],
    options: FitOptions,
    ctx: DistributedContext,
    *,
    epoch: int,
    state: FitState,
) -> dict[str, float]:
    """The steps of one epoch; updates ``state`` (step, last_eval); returns epoch statistics."""
    total = len(batches) if hasattr(batches, "__len__") else None
    if total is not None and options.max_steps_per_epoch:
        total = min(total, options.max_steps_per_epoch)
    bar = iter_with_progress(
        batches, enabled=options.progress and ctx.is_main, desc=f"epoch {epoch}", total=total
    )
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    window: dict[str, Any] = {}
    steps = window_steps = images = 0
    train_time = 0.0
    tick = time.perf_counter()
    for batch in bar:
        result = loop.train_step(batch, epoch=epoch, step=state.step)
        state.step += 1
        steps += 1
        window_steps += 1
        images += result.images
        _sum_into(sums, result.values)
        _sum_into(window, result.values)
        _sum_into(counts, result.counts)
        train_time += time.perf_counter() - tick
        if options.log_every_steps and state.step % options.log_every_steps == 0:
            means = {key: float(value) / window_steps for key, value in window.items()}
            _check_finite(means, epoch=epoch, step=state.step)
            lr = loop.learning_rate()
            loop.log(
                {
                    "type": "train",
                    "epoch": epoch,
                    "step": state.step,
                    "lr": lr,
                    **means,
                    "images_per_s": images * ctx.world_size / max(train_time, 1e-9),
                }
            )
            window, window_steps = {}, 0
            if hasattr(bar, "set_postfix") and "loss" in means:
                bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.4g}")
        if options.eval_every_steps and state.step % options.eval_every_steps == 0:
            state.last_eval = loop.evaluate(epoch, state.step)
        tick = time.perf_counter()  # evaluation time is not training time
        if options.max_steps_per_epoch and steps >= options.max_steps_per_epoch:
            break  # the next batch is never drawn
    close_bar(bar)
    keys, count_keys = sorted(sums), sorted(counts)
    summed = all_reduce_sum(
        [float(sums[k]) for k in keys]
        + [float(counts[k]) for k in count_keys]
        + [float(steps), float(images)],
        ctx,
    )
    all_steps, all_images = summed[-2], summed[-1]
    stats = {key: value / max(all_steps, 1) for key, value in zip(keys, summed, strict=False)}
    _check_finite(stats, epoch=epoch, step=state.step)
    stats.update(zip(count_keys, summed[len(keys) : len(keys) + len(count_keys)], strict=True))
    stats["images"] = int(all_images)
    stats["images_per_s"] = all_images / max(train_time, 1e-9)
    return stats


def fit(
    loop: TrainingLoop,
    options: FitOptions,
    ctx: DistributedContext,
    start: FitState | None = None,
) -> FitState:
    """Train from ``start`` (a fresh run, or where a checkpoint left off) to ``options.epochs``.

    Returns where training stopped; ``stopped`` is True when the deadline ended it early (at a
    checkpoint, so ``--resume`` continues from there).
    """
    state = FitState() if start is None else FitState(**vars(start))
    recent: deque[float] = deque(maxlen=3)  # the last epochs' durations, evaluations included
    saving = 0.0  # the longest checkpoint write so far
    for epoch in range(state.epoch, options.epochs):
        if options.deadline is not None and _agree(time.monotonic() >= options.deadline, ctx):
            state.stopped = True  # out of time before this epoch: the last checkpoint stands
            return state
        epoch_start = time.perf_counter()
        batches = loop.begin_epoch(epoch)
        stats = _train_epoch(loop, batches, options, ctx, epoch=epoch, state=state)
        lr = loop.learning_rate()
        loop.end_epoch(epoch)
        stats = loop.epoch_stats(stats)
        loop.log(
            {
                "type": "epoch",
                "epoch": epoch,
                "step": state.step,
                "lr": lr,
                "seconds": time.perf_counter() - epoch_start,
                **stats,
            }
        )
        last = epoch + 1 == options.epochs
        periodic = options.eval_every_epochs and (epoch + 1) % options.eval_every_epochs == 0
        if (periodic or last) and not _evaluated_at(state):
            state.last_eval = loop.evaluate(epoch, state.step)
        state.epoch = epoch + 1
        recent.append(time.perf_counter() - epoch_start)
        every = max(1, options.checkpoint_every_epochs)
        stop = False
        if options.deadline is not None and not last:
            # stop now unless the next due checkpoint can be written before the deadline
            to_next = every - state.epoch % every
            finish = time.monotonic() + to_next * max(recent) + 2 * saving
            stop = _agree(finish > options.deadline, ctx)
        if last or stop or state.epoch % every == 0:
            save_start = time.perf_counter()
            loop.save(epoch=state.epoch, step=state.step, last_eval=state.last_eval)
            saving = max(saving, time.perf_counter() - save_start)
        barrier(ctx)
        if stop:
            state.stopped = True
            return state
    if options.final_eval and not _evaluated_at(state):
        state.last_eval = loop.evaluate(max(options.epochs - 1, 0), state.step)
    return state


def _evaluated_at(state: FitState) -> bool:
    """Whether the last evaluation was at the current step (no second one there)."""
    return state.last_eval is not None and state.last_eval.get("step") == state.step


def _agree(flag: bool, ctx: DistributedContext) -> bool:
    """``flag`` of the main process, the same on every process (clocks differ slightly)."""
    if not ctx.distributed:
        return flag
    return all_reduce_sum([float(flag and ctx.is_main)], ctx)[0] > 0
