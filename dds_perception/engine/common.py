"""Training plumbing shared by the classifier and detector recipes.

- Distributed setup from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
  one plain process when those are absent.
- YAML recipe files applied as an argument parser's defaults (``parser.set_defaults``):
  command-line options still win; an unknown key or a bad value is a :class:`ConfigError` naming
  the file and the key (:class:`RecipeOptions`, :func:`parse_recipe_args`).
- Automatic mixed precision on CUDA (``autocast`` + ``GradScaler``).
- RNG state capture and restore, so a resumed run draws the same random numbers.
- Atomic checkpoints through :mod:`dds_perception.utils.checkpoint`.
- A JSON-lines metrics writer and a non-finite-loss stop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from dds_perception.utils.checkpoint import load_training_state, save_training_state
from dds_perception.utils.errors import DdsPerceptionError, UsageError
from dds_perception.utils.io import atomic_open
from dds_perception.utils.runtime import resolve_device


class ConfigError(DdsPerceptionError, ValueError):
    """A recipe file is unreadable or holds an unknown key or a bad value."""


class TrainingError(DdsPerceptionError, ValueError):
    """Training cannot go on (non-finite loss, resume mismatch, existing run folder)."""


# ------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs: rank, world size, device; ``is_main`` writes the outputs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group described by torchrun's variables, or run as one process.

    Under torchrun each process takes GPU ``LOCAL_RANK`` (NCCL) when CUDA is used, or runs on the
    CPU with the Gloo backend.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, chosen)


def cleanup_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], ctx: DistributedContext) -> list[float]:
    """Sum ``values`` over all processes (identity in a single process)."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj: Any, ctx: DistributedContext) -> list[Any]:
    """``obj`` of every process, by rank (``[obj]`` in a single process); all ranks must call."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def run_distributed(
    train: Callable[[argparse.Namespace, DistributedContext], dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run ``train(args, ctx)`` in the process group torchrun describes, then leave it."""
    ctx = init_distributed(args.device)
    try:
        return train(args, ctx)
    finally:
        cleanup_distributed()


def wrap_ddp(model: torch.nn.Module, ctx: DistributedContext) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several processes train (else itself)."""
    if not ctx.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
    )


# ------------------------------------------------------------------------------ recipe files

# The options a recipe may set, per parser: the Action objects ``add_argument`` returned.
_RECIPE_OPTIONS: weakref.WeakKeyDictionary[argparse.ArgumentParser, dict[str, argparse.Action]]
_RECIPE_OPTIONS = weakref.WeakKeyDictionary()


class _RecordingGroup:
    """An argument group that records the options added to it as recipe keys."""

    def __init__(self, group: Any, table: dict[str, argparse.Action]) -> None:
        self._group = group
        self._table = table

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self._group.add_argument(*args, **kwargs)
        self._table[action.dest] = action
        return action


class RecipeOptions:
    """Adds a training command's options to ``parser`` and remembers them as recipe keys.

    A YAML recipe (``--config``) may set any option added through this object, by its name
    (``-`` or ``_``); :func:`parse_recipe_args` applies the recipe with ``parser.set_defaults``
    before parsing, so options given on the command line still win. Several helpers may add to
    one parser (each through its own ``RecipeOptions(parser)``).
    """

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.actions = _RECIPE_OPTIONS.setdefault(parser, {})

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self.parser.add_argument(*args, **kwargs)
        self.actions[action.dest] = action
        return action

    def group(self, title: str, description: str | None = None) -> _RecordingGroup:
        """A new argument group (for ``--help``) whose options are recipe keys too."""
        return _RecordingGroup(self.parser.add_argument_group(title, description), self.actions)

    def show_defaults(self) -> None:
        """Append ``(default: X)`` to help texts that do not show their default yet."""
        for action in self.actions.values():
            if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
                continue  # flags (--x/--no-x) show their default by themselves
            text = action.help or ""
            if "%(default)" not in text:
                action.help = f"{text} (default: %(default)s)".strip()


def _convert(action: argparse.Action, value: Any, file: Path) -> Any:
    """Give a recipe value the type the option would have parsed it to; raise on a bad one."""
    if value is None:
        return None
    convert = action.type
    try:
        if action.nargs == 0:  # flags: store_true / --x/--no-x
            if not isinstance(value, bool):
                raise UsageError(f"expected true or false, got {value!r}")
            return value
        if action.nargs in ("*", "+") or isinstance(action.nargs, int):
            items = list(value) if isinstance(value, list | tuple) else [value]
            items = [convert(v) if convert else v for v in items]
            if isinstance(action.nargs, int) and len(items) != action.nargs:
                raise UsageError(f"expected {action.nargs} values, got {len(items)}")
            if action.nargs == "+" and not items:
                raise UsageError("expected at least one value")
            return items
        if isinstance(value, list | tuple | dict):
            raise UsageError(f"expected one value, got {value!r}")
        if convert is int and isinstance(value, float) and not value.is_integer():
            raise UsageError(f"expected an integer, got {value!r}")
        if convert is not None and not isinstance(value, bool):
            value = convert(value)
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"{value!r} is not one of {list(action.choices)}")
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"{file}: bad value for {action.dest!r}: {error}") from error
    return value


def load_recipe(
    path: str | os.PathLike[str], options: Mapping[str, argparse.Action]
) -> dict[str, Any]:
    """Read a recipe file into ``{option dest: value}``, each value checked and converted.

    Keys are option names (``-`` or ``_``); an unknown key or a bad value is a
    :class:`ConfigError` naming the file and the key.
    """
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {file}") from error
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{file}: unreadable config ({error})") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: a config must be a mapping of option: value")
    known = {dest: action for dest, action in options.items() if dest not in ("config", "help")}
    values: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise ConfigError(
                f"{file}: unknown key {key!r}; known keys: {', '.join(sorted(known))}"
            )
        values[dest] = _convert(known[dest], value, file)
    return values


def parse_recipe_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv`` with the recipe named by ``--config`` as the parser's defaults.

    The recipe goes through ``parser.set_defaults`` before ``argv`` is parsed, so an option
    given on the command line wins, even when it equals the default.
    """
    argv = list(argv) if argv is not None else None
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", type=Path, default=None)
    known, _ = early.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**load_recipe(known.config, _RECIPE_OPTIONS.get(parser, {})))
    return parser.parse_args(argv)


def add_resume_argument(group: _RecordingGroup, checkpoint: str = "checkpoint.pt") -> None:
    """``--resume [CHECKPOINT]``: continue a run (bare: OUT/<checkpoint>)."""
    group.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help=f"continue from OUT/{checkpoint} (or the given checkpoint)",
    )


def add_speed_arguments(
    options: RecipeOptions,
    *,
    channels_last_help: str,
    max_steps_help: str,
    amp_help: str = "float16 mixed precision on CUDA (ignored on CPU)",
) -> _RecordingGroup:
    """The "speed" group both trainers share: --device, --amp, --channels-last, step cap."""
    group = options.group("speed")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help=amp_help)
    group.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=channels_last_help,
    )
    group.add_argument("--max-steps-per-epoch", type=int, default=0, help=max_steps_help)
    return group


def training_command(
    add_training_arguments: Callable[[argparse.ArgumentParser], None],
    main: Callable[[argparse.Namespace], Any],
) -> tuple[
    Callable[[argparse.ArgumentParser], None],
    Callable[[argparse.ArgumentParser, Sequence[str]], argparse.Namespace],
    Callable[[argparse.Namespace], int],
]:
    """``add_arguments``, ``parse_arguments`` and ``run`` of a CLI training command.

    ``parse_arguments`` (see ``dds_perception.cli``) applies the recipe file of ``--config``
    through :func:`parse_recipe_args`; ``run`` trains with :func:`main`.
    """

    def run(args: argparse.Namespace) -> int:
        main(args)
        return 0

    return add_training_arguments, parse_recipe_args, run


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if hasattr(value, "to_dict"):  # option values parsed into small spec objects
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """JSON/YAML-friendly view of resolved arguments (paths as strings, specs as mappings)."""
    return {k: _plain(v) for k, v in vars(args).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------ precision


def autocast(
    device: torch.device, enabled: bool, dtype: torch.dtype = torch.float16
) -> contextlib.AbstractContextManager:
    """``dtype`` (float16 or bfloat16) autocast on CUDA when ``enabled``; else a no-op."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def make_grad_scaler(
    device: torch.device, enabled: bool, dtype: torch.dtype = torch.float16
) -> torch.amp.GradScaler:
    """A GradScaler that is active only with float16 AMP on CUDA (bfloat16 needs none;
    disabled scalers pass through)."""
    active = enabled and device.type == "cuda" and dtype == torch.float16
    return torch.amp.GradScaler("cuda", enabled=active)


def check_finite(loss: torch.Tensor, *, epoch: int, step: int) -> None:
    """Stop training with a clear error when the loss is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"loss is {value} at epoch {epoch}, step {step}: training diverged "
            "(try a lower --lr, or --no-amp)"
        )


# ------------------------------------------------------------------------------ RNG states


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch CPU and CUDA generator states, in a weights_only-safe form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------ checkpoints

save_checkpoint = save_training_state
load_checkpoint = load_training_state


def prepare_run_dir(
    out: str | os.PathLike[str] | None,
    resume: str | None,
    *,
    checkpoint: str,
    weights: str,
) -> tuple[Path, Path | None]:
    """Check ``--out`` / ``--resume`` before any work; return (run folder, checkpoint or None).

    ``resume`` is ``None`` (a fresh run: the folder must not hold one already), ``"auto"``
    (``out/checkpoint``) or a checkpoint path, which must exist. Nothing is created here.
    """
    if out is None:
        raise UsageError("--out is required (the run folder)")
    out = Path(out)
    checkpoint_path = out / checkpoint
    if resume is not None:
        resume_path = checkpoint_path if resume == "auto" else Path(resume)
        if not resume_path.is_file():
            raise TrainingError(f"--resume: no checkpoint at {resume_path}")
        return out, resume_path
    if checkpoint_path.exists() or (out / weights).exists():
        raise TrainingError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    return out, None


def make_run_dir(out: Path, ctx: DistributedContext) -> None:
    """Create the run folder on the main process; every process waits for it."""
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(ctx)


def write_args_yaml(out: Path, args: argparse.Namespace, ctx: DistributedContext) -> None:
    """Record the resolved arguments as ``out/args.yaml`` (main process, atomically)."""
    if ctx.is_main:
        with atomic_open(out / "args.yaml", "w", encoding="utf-8") as handle:
            yaml.safe_dump(args_to_dict(args), handle, sort_keys=True)


def restore_training_state(
    state: Mapping[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load model, optimizer, scheduler and grad-scaler states from a training checkpoint."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without AMP (e.g. a CPU run resumed on CUDA)
        scaler.load_state_dict(state["scaler"])


def gather_random_streams(generator: torch.Generator, ctx: DistributedContext) -> list[Any]:
    """Every process's [RNG states, loader generator state], so each resumes its own streams.

    All ranks must call.
    """
    return gather_objects([capture_rng_state(), generator.get_state()], ctx)


def restore_random_streams(
    streams: list[Any],
    generator: torch.Generator,
    ctx: DistributedContext,
    *,
    source: Path,
    strict: bool,
) -> None:
    """Restore this process's streams saved by :func:`gather_random_streams`.

    When the checkpoint was written by another number of processes, raise (``strict``) or warn
    that the random augmentations will differ from an uninterrupted run's.
    """
    if len(streams) != ctx.world_size:
        if strict:
            raise TrainingError(
                f"cannot resume exactly from {source}: written by {len(streams)} "
                f"process(es), this run has {ctx.world_size}"
            )
        warnings.warn(
            f"{source} was written by {len(streams)} process(es), this run has "
            f"{ctx.world_size}: training goes on, but its random augmentations differ from "
            "an uninterrupted run's",
            stacklevel=4,  # the caller of the training function
        )
        return
    rng, loader_state = streams[ctx.rank]
    restore_rng_state(rng)
    generator.set_state(loader_state)


def resume_run(
    path: Path,
    *,
    identity: Mapping[str, Any],
    resume_keys: list[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    metrics: MetricsWriter,
    ctx: DistributedContext,
    strict_streams: bool,
) -> tuple[int, int, dict[str, Any] | None]:
    """Continue a run from checkpoint ``path``; return (start epoch, step, last eval record).

    The checkpoint must have been trained with the same ``resume_keys`` of ``identity``; metrics
    written after it (by a run killed mid-epoch) are dropped. ``strict_streams``: see
    :func:`restore_random_streams`.
    """
    state = load_checkpoint(path)
    check_resume_matches(state["identity"], identity, resume_keys, path)
    restore_training_state(
        state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
    )
    # one per process: [RNG states, loader generator]
    restore_random_streams(
        state["random_streams"], generator, ctx, source=path, strict=strict_streams
    )
    start_epoch, step, last_eval = state["epoch"], state["step"], state.get("last_eval")
    metrics.truncate_after(step)
    if ctx.is_main:
        print(f"resumed from {path}: epoch {start_epoch}, step {step}")
    return start_epoch, step, last_eval


def training_checkpoint(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    random_streams: list[Any],
    epoch: int,
    step: int,
    last_eval: Mapping[str, Any] | None,
    identity: Mapping[str, Any],
    resume_keys: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The state :func:`save_checkpoint` writes after an epoch (``epoch`` = epochs done)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "random_streams": random_streams,
        "epoch": epoch,
        "step": step,
        "last_eval": last_eval,
        "identity": {key: identity.get(key) for key in resume_keys},
        "args": args_to_dict(args),
    }


def check_resume_matches(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: list[str], source: Path
) -> None:
    """Raise when a checkpoint was trained with other ``keys`` (model, dataset, classes...)."""
    for key in keys:
        if saved.get(key) != current.get(key):
            shown_saved, shown_now = saved.get(key), current.get(key)
            if isinstance(shown_saved, list) and len(shown_saved) > 8:
                shown_saved = f"{len(shown_saved)} items"
                shown_now = f"{len(shown_now or [])} items"
            raise TrainingError(
                f"cannot resume from {source}: it was trained with {key}={shown_saved!r}, "
                f"this run has {key}={shown_now!r}"
            )


# ------------------------------------------------------------------------------ metrics


class MetricsWriter:
    """Append one JSON object per line to ``path`` (only on the main process)."""

    def __init__(self, path: str | os.PathLike[str], *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record), sort_keys=False) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records beyond ``step`` (left by a run killed after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        with atomic_open(self.path, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines metrics file; a torn last line (killed run) is ignored."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def iter_with_progress(iterable: Any, *, enabled: bool, **kwargs: Any) -> Any:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (the main process), else itself.

    The bar object is returned (iterate it; ``set_postfix`` works); close it with
    :func:`close_bar` when a loop may stop early, so it does not linger.
    """
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


def close_bar(bar: Any) -> None:
    """Close a bar made by :func:`iter_with_progress` (no-op for a plain iterable)."""
    if hasattr(bar, "close"):
        bar.close()
