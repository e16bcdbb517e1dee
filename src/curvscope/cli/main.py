"""``curvscope lab | probe | report``: thin commands over the lab, the diagnosis and the report.

Every error a user can fix prints one line, ``curvscope COMMAND: error: MESSAGE`` naming the
problem (and the fix where there is one), on stderr, and exits with status 2 — argparse's own
convention, which the argument errors follow too (one line, without the usage block). Which
errors count as the user's:

- the arguments: validated by argparse ``type=`` functions and the checks below;
- the user's code: any exception raised while importing ``--model/--data/--loss`` modules or
  calling their factories, or a factory returning the wrong kind of thing;
- the user's files: a checkpoint that is missing, unreadable, not a state_dict of tensors, or
  refused by the safe loader; a run log that is not one;
- curvscope's refusals of the user's model, loss and data (``ValueError``, ``TypeError``,
  ``FloatingPointError``: what the library raises for bad input) — caught only where the
  model, the data or the log is the user's, so that with a built-in problem a genuine bug
  keeps its traceback.

``--debug`` re-raises instead, with the full traceback (and the chained cause).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

#: What curvscope raises when it refuses what it was given (STYLE.md: ValueError/TypeError that
#: say "expected X, got Y"; FloatingPointError for non-finite values; read_log's format error is
#: a ValueError). Turned into one line only around the user's model, data and log.
REFUSALS = (ValueError, TypeError, FloatingPointError)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


@contextlib.contextmanager
def _refusals(where: str = "") -> Iterator[None]:
    """curvscope's refusals of the user's model, data or log, as a UsageError."""
    try:
        yield
    except REFUSALS as e:
        raise UsageError(
            f"{where}{_one_line(e) or type(e).__name__} (--debug shows the traceback)"
        ) from e


# ------------------------------------------------------------------ argparse type= checks
def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def momentum_beta(text: str) -> float:
    """A momentum coefficient β in [0, 1)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def folder(text: str) -> str:
    """An output folder's path, not empty (``--out ''`` wrote into the working directory, and
    ``--report ''`` wrote no report, both without a word)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"an empty path {text!r}; name a folder")
    return text


def name_list(text: str) -> list[str]:
    """Comma-separated names, none of them empty or named twice."""
    names = [a.strip() for a in text.split(",")]
    if not any(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    if not all(names):
        raise argparse.ArgumentTypeError(f"an empty name in {text!r}; drop the extra comma")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # it was run twice, its rows side by side in the table and the plots
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} named twice in {text!r}")
    return names


@contextlib.contextmanager
def _writing(out: Path, flag: str = "--out") -> Iterator[None]:
    """Writing into the output folder: an OSError there — a file in it that is not ours to
    overwrite, a full disk — as one line naming the file and the fix (it was a traceback)."""
    try:
        yield
    except OSError as e:
        name = str(e.filename or out)
        written = (  # a refusal (FileExistsError) comes before anything is written
            ""
            if isinstance(e, FileExistsError)
            else " (what was written there before the failure may be incomplete)"
        )
        raise UsageError(
            f"cannot write {name!r}: {e.strerror or e}; choose another folder with {flag}{written}"
        ) from e


def _writable(out: Path, flag: str = "--out") -> Path:
    if out.exists() and not out.is_dir():  # mkdir's "File exists" said neither (a review)
        raise UsageError(
            f"{flag} {str(out)!r} is a file, not a folder; give a folder (a new one is made)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".curvscope-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to the output folder {str(out)!r}: {e.strerror}; "
            f"choose another with {flag}"
        ) from e
    return out


def _import(spec: str, what: str) -> Any:
    """``pkg.module:attr`` -> the attribute (this imports and runs the user's module)."""
    mod_name, _, attr = spec.partition(":")
    if not (mod_name and attr):
        raise UsageError(f"{what} must look like pkg.module:name, got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except SystemExit as e:  # a script run on import (printed nothing, exit 0: a review)
        raise UsageError(_exited(f"importing {mod_name!r} for {what}", e)) from e
    except Exception as e:  # the user's module: any import failure is a usage error
        raise UsageError(f"cannot import {mod_name!r} for {what}: {type(e).__name__}: {e}") from e
    finally:
        sys.path.pop(0)
    if not hasattr(mod, attr):
        raise UsageError(f"{mod_name!r} has no attribute {attr!r} (for {what})")
    return getattr(mod, attr)


def _call(spec: str, what: str) -> Any:
    """Import the factory ``pkg.module:name`` and call it: the user's code, whose every
    exception is the user's."""
    factory = _import(spec, what)
    if not callable(factory):
        raise UsageError(
            f"{what} {spec} is {_a(factory)}, not a factory; point it at a "
            "function that takes no arguments"
        )
    try:
        return factory()
    except SystemExit as e:
        raise UsageError(_exited(f"{what} {spec}", e)) from e
    except Exception as e:
        raise UsageError(f"{what} {spec} raised {type(e).__name__}: {e}") from e


def _exited(doing: str, e: SystemExit) -> str:
    """The user's code called ``sys.exit``: a script whose training runs on import."""
    return (
        f"{doing} called sys.exit({e.code!r}), so there is nothing to probe; a training "
        'script run on import? Put its training under `if __name__ == "__main__":`, or '
        "point at a module that only defines the model and data"
    )


# ------------------------------------------------------------------------------------ lab
def _lab(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from curvscope import lab, report

    try:
        problem_names, optimizer_names = lab.selection(args.problems, args.optimizers)
    except ValueError as e:
        raise UsageError(str(e)) from e
    out = _writable(Path(args.out))
    with _writing(out):  # refused before the runs, not after them
        report.html.claim_folder(out, "lab")
    console = Console(width=None if sys.stdout.isatty() else 110)
    budget = lab.QUICK if args.quick else lab.Budget()
    n_runs = len(problem_names) * len(optimizer_names)
    # the bar on stderr, the table on stdout: `curvscope lab > table.txt` showed no progress
    # (and the label names the run just done, as it says: an outside review)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("lab", total=n_runs)

        def on_run(run: lab.Run) -> None:
            done = f"done: {run.problem}: {run.optimizer}"
            bar.update(task, advance=1, description=done)

        try:
            results = lab.run_lab(problem_names, optimizer_names, budget=budget, on_run=on_run)
        except lab.LabInterrupted as stop:  # Ctrl-C: the finished runs are kept, said so
            if not stop.results["runs"]:
                raise KeyboardInterrupt from None  # none finished: nothing to write
            results = stop.results
            if _Stop.signal:  # what stopped it, in the report ("Ctrl-C" otherwise)
                results["interrupted"]["signal"] = _Stop.signal
    try:
        with _writing(out):
            path = report.write_lab(results, out)
    except KeyboardInterrupt:  # while the plots were drawn: the runs are kept all the same
        _report_cut(results, n_runs)
        with _writing(out):
            path = report.write_lab(results, out, draw=False)
    console.print(_runs_table(results, Table))  # the finished runs, interrupted or not
    if results["interrupted"]:
        n = results["interrupted"]
        when = " while writing the report (its plots left out)" if n.get("report_cut") else ""
        print(
            f"curvscope lab: {_Stop.word()}{when} after {n['runs_done']} of "
            f"{n['runs_planned']} runs; wrote the finished ones to {out / 'results.json'} "
            f"and {path}",
            file=sys.stderr,
        )
        return _Stop.status()
    console.print(f"wrote {out / 'results.json'} and {path} in {results['seconds']:.1f} s")
    return 0


def _report_cut(results: dict[str, Any], planned: int) -> None:
    """Record in ``results`` an interrupt that came while the lab's report was being written —
    its plots take seconds, and Ctrl-C or SIGTERM there lost every finished run, results.json
    included (an outside review) — as one during the runs is recorded (``runs_done``,
    ``runs_planned``, ``signal``), with ``"report_cut": True``: the report is then written
    without its plots."""
    cut = results["interrupted"] or {"runs_done": len(results["runs"]), "runs_planned": planned}
    cut["report_cut"] = True
    if _Stop.signal:
        cut["signal"] = _Stop.signal
    results["interrupted"] = cut


def _runs_table(results: dict[str, Any], Table: Any) -> Any:
    """The terminal's table of the lab's runs (rich's ``Table``, imported by the caller)."""
    table = Table(title="curvscope lab")
    for col in ("problem", "optimizer", "outcome", "steps", "final loss", "grads", "products", "s"):
        table.add_column(
            col, justify="left" if col in ("problem", "optimizer", "outcome") else "right"
        )
    for r in results["runs"]:
        outcome = r["outcome"] + (f" @{r['diverged_at']}" if r["diverged_at"] else "")
        table.add_row(
            r["problem"],
            r["optimizer"],
            outcome,
            str(r["steps"]),
            f"{r['final_loss']:.4g}",
            str(r["gradients"]),
            str(r["products"]),
            f"{r['wall']:.2f}",
        )
    return table


# ---------------------------------------------------------------------------------- probe
def _check_probe_flags(args: argparse.Namespace) -> None:
    if args.problem:
        mixed = [f"--{k}" for k in ("model", "data", "loss", "checkpoint") if getattr(args, k)]
        if mixed:
            raise UsageError(
                f"--problem brings its own model and data, so {', '.join(mixed)} would be "
                "ignored; give either --problem NAME or --model and --data (with --loss, "
                "--checkpoint)"
            )
    elif not (args.model and args.data):
        raise UsageError(
            "give --problem NAME, or --model pkg.module:factory and "
            "--data pkg.module:loader_factory"
        )
    if args.optimizer_state and not args.optimizer:
        raise UsageError(
            "--optimizer-state needs --optimizer (gd, momentum, adam or adamw: the optimizer "
            "that saved it)"
        )
    if args.optimizer in ADAPTIVE and not args.optimizer_state:
        raise UsageError(
            f"--optimizer {args.optimizer} needs --optimizer-state FILE: its stability limit "
            "is on the curvature its preconditioner √v̂ + ε scales, which lives in its state "
            "(save it with torch.save(optimizer.state_dict(), FILE))"
        )
    if args.optimizer and args.lr is None and not args.optimizer_state:
        raise UsageError(f"--optimizer {args.optimizer} needs --lr (or --optimizer-state)")
    if args.momentum is not None and (args.optimizer != "momentum" or args.optimizer_state):
        raise UsageError(
            "--momentum sets the β of --optimizer momentum (without --optimizer-state, whose "
            "saved groups hold their own)"
        )


def _probe(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) the process group is started here — gloo on CPU, NCCL
    when CUDA is there — and ended here once every rank is done (a rank that exits with the
    group alive aborts in gloo's threads). A built-in ``--problem`` runs on one intra-op thread,
    as the lab does (:func:`curvscope.lab.lab.one_thread`)."""
    import os

    import torch
    import torch.distributed as dist

    from curvscope.lab.lab import one_thread

    _check_probe_flags(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        # a built-in problem is small, as the lab's are: one thread, as the lab runs (166
        # products took 18-30 s at torch's default two threads on a busy 2-core machine, 2 s at
        # one: an outside review); a user's model keeps torch's setting (OMP_NUM_THREADS)
        with one_thread() if args.problem else contextlib.nullcontext():
            return _probe_on_rank(args, dist.get_rank() if world > 1 else 0, world)
    finally:
        if started:
            dist.barrier()
            dist.destroy_process_group()


def _built_in(name: str, rank: int, world: int) -> tuple[Any, Any, Any]:
    from curvscope import problems

    try:
        p = problems.get(name)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if not isinstance(p, problems.ModelProblem):
        raise UsageError(
            f"--problem needs a model problem, got the function {name!r}; model problems: "
            + ", ".join(
                n for n in problems.names() if isinstance(problems.get(n), problems.ModelProblem)
            )
        )
    X, y = p.data
    return p.make_model(0), p.loss_fn, (X[rank::world], y[rank::world])  # this rank's shard


def _users(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from torch import nn

    from curvscope.derivatives.huggingface import is_hugging_face

    model = _call(args.model, "--model")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model {args.model} returned {_a(model)}, not a torch.nn.Module; "
            "the factory must return the model"
        )
    data = _call(args.data, "--data")
    if args.loss:
        loss_fn = _call(args.loss, "--loss")
        if not callable(loss_fn):
            raise UsageError(
                f"--loss {args.loss} returned {_a(loss_fn)}, which cannot be "
                "called as loss(outputs, targets); return e.g. torch.nn.CrossEntropyLoss()"
            )
    else:  # a Hugging Face model computes its own loss (loss_fn=None)
        loss_fn = None if is_hugging_face(model) else nn.CrossEntropyLoss()
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    return model, loss_fn, data


# ----------------------------------------------------------------------- optimizer state
#: The optimizers whose stability limit needs their state (the preconditioner).
ADAPTIVE = ("adam", "adamw")
#: What each optimizer keeps per parameter (a state that lacks it is another optimizer's).
_STATE_KEY = {"momentum": "momentum_buffer", "adam": "exp_avg_sq", "adamw": "exp_avg_sq"}
#: What each optimizer's parameter groups hold (an Adam state given to gd failed in a traceback)
_GROUP_KEY = {"gd": "momentum", "momentum": "momentum", "adam": "betas", "adamw": "betas"}
_STATE_FIX = "save it with torch.save(optimizer.state_dict(), FILE) from the run being judged"


def _build_optimizer(args: argparse.Namespace, model: Any) -> Any:
    """The optimizer ``--optimizer`` names over the model's trainable parameters, with the
    state of ``--optimizer-state`` loaded (its learning rates unless ``--lr`` is given)."""
    import torch

    from curvscope import optim

    if not args.optimizer:
        return None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    state = _read_optimizer_state(args.optimizer_state) if args.optimizer_state else None
    groups = [[p for _, p in named]] if state is None else _state_groups(state, named, model, args)
    params = [{"params": g} for g in groups]
    lr = 1e-3 if args.lr is None else args.lr  # without --lr, the state's own replace it
    if args.optimizer == "adamw":
        optimizer: Any = torch.optim.AdamW(params, lr=lr)
    elif args.momentum is not None:
        optimizer = optim.build(args.optimizer, params, lr=lr, momentum=args.momentum)
    else:
        optimizer = optim.build(args.optimizer, params, lr=lr)
    if state is not None:
        try:
            optimizer.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise UsageError(
                f"cannot load the optimizer state {args.optimizer_state!r}: {e}; {_STATE_FIX}"
            ) from e
        if args.lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = args.lr
    return optimizer


def _read_optimizer_state(path: str) -> dict[str, Any]:
    state = _read_checkpoint(path)
    if not (isinstance(state, Mapping) and {"state", "param_groups"} <= set(state)):
        what = "a model's state_dict" if isinstance(state, Mapping) else _a(state)
        raise UsageError(
            f"the optimizer state {path!r} holds {what}, not an optimizer's state_dict (a "
            f"dict with 'state' and 'param_groups'); {_STATE_FIX}"
        )
    return dict(state)


def _state_groups(
    state: Mapping[str, Any], named: list[tuple[str, Any]], model: Any, args: argparse.Namespace
) -> list[list[Any]]:
    """The model's parameters in the saved parameter groups, checked against the state."""
    path = args.optimizer_state
    saved = state["param_groups"]
    sizes = [len(g["params"]) for g in saved]
    if sum(sizes) != len(named):
        raise UsageError(
            f"the optimizer state {path!r} is for {sum(sizes)} parameters, the model has "
            f"{len(named)} that require grad; {_STATE_FIX}"
        )
    by_name = dict(named)
    if all("param_names" in g for g in saved):  # torch's optimizers built on named_parameters
        unknown = [n for g in saved for n in g["param_names"] if n not in by_name]
        if unknown:
            raise UsageError(
                f"the optimizer state {path!r} names parameters the model does not have: "
                f"{_few(unknown)}; {_STATE_FIX}"
            )
        groups = [[by_name[n] for n in g["param_names"]] for g in saved]
    elif len(saved) == 1:
        groups = [[p for _, p in named]]
    else:
        groups = _trainer_groups(model, sizes, path)
    _check_state_shapes(state, saved, groups, {id(p): n for n, p in named}, args)
    return groups


def _trainer_groups(model: Any, sizes: list[int], path: str) -> list[list[Any]]:
    """Several unnamed groups: the Hugging Face Trainer's (weight decay, then none), the
    only grouping that can be recognised without names."""
    from curvscope.derivatives.huggingface import trainer_parameter_groups

    groups = trainer_parameter_groups(model)
    if groups is None or [len(g) for g in groups] != sizes:
        raise UsageError(
            f"the optimizer state {path!r} has {len(sizes)} parameter groups of "
            f"{', '.join(map(str, sizes))} parameters without their names, so which parameter "
            "each state belongs to cannot be told; save the state of an optimizer built on "
            "model.named_parameters() (torch then saves the names), or on model.parameters() "
            "in one group"
        )
    return groups


def _check_state_shapes(
    state: Mapping[str, Any],
    saved: list[Mapping[str, Any]],
    groups: list[list[Any]],
    names: dict[int, str],
    args: argparse.Namespace,
) -> None:
    """Every saved per-parameter tensor has its parameter's shape, and the state is the kind
    ``--optimizer`` keeps (Adam's exp_avg_sq, momentum's momentum_buffer)."""
    import torch

    path, key = args.optimizer_state, _STATE_KEY.get(args.optimizer)
    per_param = state["state"]
    for group, params in zip(saved, groups, strict=True):
        for index, p in zip(group["params"], params, strict=True):
            entry = per_param.get(index, {})
            if key is not None and entry and key not in entry:
                raise UsageError(
                    f"the optimizer state {path!r} holds {', '.join(map(str, entry))} for "
                    f"{names[id(p)]!r}, not {key!r}: it is not the state of --optimizer "
                    f"{args.optimizer}; give the optimizer that saved it"
                )
            for k, v in entry.items():
                if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape != p.shape:
                    raise UsageError(
                        f"the optimizer state {path!r} does not fit the model: its {k!r} for "
                        f"{names[id(p)]!r} has shape {tuple(v.shape)}, the parameter "
                        f"{tuple(p.shape)}; {_STATE_FIX}"
                    )
    group_key = _GROUP_KEY.get(args.optimizer)
    if group_key is not None and any(group_key not in g for g in saved):
        raise UsageError(
            f"the optimizer state {path!r} has parameter groups without {group_key!r}: it is not "
            f"the state of --optimizer {args.optimizer}; give the optimizer that saved it"
        )


def _refused_pickle(path: str, e: pickle.UnpicklingError) -> UsageError:
    """torch's safe loader refused the file: say what it met, in one line, without torch's
    advice to load it unsafely."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        why = (
            f"it asks to import {found.group(1)}, which a state_dict never does (nothing in "
            "it was run)"
        )
    else:
        op = re.search(r"Unsupported operand \d+", text)
        why = f"it is not a torch checkpoint ({op.group(0) if op else 'an unreadable pickle'})"
    return UsageError(
        f"the checkpoint {path!r} was refused: {why}; a checkpoint must hold the model's "
        "state_dict, its tensors only: torch.save(model.state_dict(), path)"
    )


def _a(x: object) -> str:
    """'an int', 'a list': the type of ``x`` with its article."""
    name = type(x).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _few(names: Sequence[str], k: int = 4) -> str:
    shown = ", ".join(map(repr, names[:k]))
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _load_checkpoint(model: Any, path: str) -> None:
    """Load a state_dict with torch's safe loader (tensors and plain containers only) and check
    it against the model's own before loading: every mismatch is one line."""
    state = _read_checkpoint(path)
    own = model.state_dict()
    _check_checkpoint(state, own, path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"cannot load the checkpoint {path!r} into the model: {e}") from e


#: How to make a checkpoint that fits, said after every mismatch.
_CHECKPOINT_FIX = "save it with torch.save(model.state_dict(), path) from this model"


def _read_checkpoint(path: str) -> Any:
    """The file's content through torch's safe loader; what it cannot read is one line."""
    import torch

    try:
        with warnings.catch_warnings():  # e.g. a pickle protocol torch does not expect
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as e:
        raise UsageError(f"no checkpoint file at {path!r}") from e
    except OSError as e:
        raise UsageError(f"cannot read the checkpoint {path!r}: {e.strerror or e}") from e
    except pickle.UnpicklingError as e:
        raise _refused_pickle(path, e) from e
    except EOFError as e:
        raise UsageError(f"the checkpoint {path!r} is empty or cut short") from e
    except Exception as e:  # the user's file: whatever torch cannot read in it
        first = str(e).split(". ")[0] or type(e).__name__
        raise UsageError(f"cannot load the checkpoint {path!r}: {first}") from e


def _check_checkpoint(state: Any, own: Mapping[str, Any], path: str) -> None:
    """A state_dict with the model's keys, a tensor of the model's shape under each."""
    import torch

    if not isinstance(state, Mapping):
        raise UsageError(
            f"the checkpoint {path!r} holds {_a(state)}, not a state_dict (a dict "
            f"of parameter name -> tensor); {_CHECKPOINT_FIX}"
        )
    _check_checkpoint_keys(state, own, path)
    for k, mine in own.items():
        theirs = state[k]
        if not isinstance(theirs, torch.Tensor):
            raise UsageError(
                f"the checkpoint {path!r} holds {_a(theirs)} for {k!r}, not a tensor; "
                f"{_CHECKPOINT_FIX}"
            )
        if theirs.shape != mine.shape:
            raise UsageError(
                f"the checkpoint {path!r} does not fit the model: {k!r} has shape "
                f"{tuple(theirs.shape)} there and {tuple(mine.shape)} in the model; was it "
                "saved from another configuration?"
            )


def _check_checkpoint_keys(state: Mapping[Any, Any], own: Mapping[str, Any], path: str) -> None:
    """The same keys as the model's state_dict, or one line naming the differences (and the
    entry the weights look to be under, for a checkpoint that nests them)."""
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    if not (missing or unexpected):
        return
    parts = ([f"missing {_few(missing)}"] if missing else []) + (
        [f"unexpected {_few(unexpected)}"] if unexpected else []
    )
    nested = [k for k, v in state.items() if isinstance(v, Mapping) and set(own) <= set(v)]
    hint = (
        f"; the model's weights look to be under {nested[0]!r}: save that entry alone"
        if nested
        else f"; {_CHECKPOINT_FIX}"
    )
    raise UsageError(
        f"the checkpoint {path!r} does not fit the model: keys {'; '.join(parts)}{hint}"
    )


def _probe_on_rank(args: argparse.Namespace, rank: int, world: int) -> int:
    from curvscope.lab.probe import probe, summary_lines

    users = not args.problem
    model, loss_fn, data = _users(args) if users else _built_in(args.problem, rank, world)
    out = _writable(Path(args.report), "--report") if args.report else None
    if out is not None:
        from curvscope.report.html import claim_folder

        with _writing(out, "--report"):  # refused before the curvature, not after it
            claim_folder(out, "probe")
    # the user's model, loss and data: curvscope's refusals of them are one line; with a
    # built-in problem and validated flags, any exception is a bug and keeps its traceback
    with _refusals() if users else contextlib.nullcontext():
        optimizer = _build_optimizer(args, model)
        lr = args.lr if optimizer is None else None
        result = probe(
            model,
            loss_fn,
            data,
            lr=lr,
            optimizer=optimizer,
            slices=out is not None,
            reduction=args.reduction,
        )
    result["world_size"] = world
    if rank != 0:  # every rank computed the same numbers; one speaks
        return 0
    if out is not None:
        from curvscope.report.html import write_probe_report

        with _writing(out, "--report"):
            result["report"] = str(write_probe_report(result, out))
    if args.json:
        from curvscope.diagnosis.runlog import jsonable

        # valid JSON: a non-finite number (a limit at lr 1e-320) as its string, never Infinity
        print(json.dumps(jsonable(result), default=str, allow_nan=False))
        return 0
    print(result["text"])
    print("\n".join(summary_lines(result)))
    if out is not None:
        print(f"wrote {result['report']}")
    return 0


# --------------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    from curvscope.diagnosis.runlog import read_runs
    from curvscope.report import write_log_report

    path = Path(args.log)
    if path.is_dir():  # "no run log at" a folder that is there read as a typo
        logs = sorted(p.name for p in path.glob("*.jsonl"))[:3]
        hint = f" (it holds {', '.join(logs)})" if logs else ""
        raise UsageError(f"{str(path)!r} is a folder; give the run log file in it{hint}")
    if not path.exists():  # (not is_file: a log piped in as /dev/stdin is read too)
        raise UsageError(f"no run log at {str(path)!r}")
    from curvscope.diagnosis import LogFormatError

    try:
        all_runs = read_runs(path)  # parsed once: a long log took two full parses
    except OSError as e:
        raise UsageError(f"cannot read the run log {str(path)!r}: {e.strerror or e}") from e
    except LogFormatError as e:  # its message names the file, the line and the field
        raise UsageError(_one_line(str(e))) from e
    except (ValueError, TypeError, AttributeError) as e:
        raise UsageError(
            f"{str(path)!r} is not a curvscope run log (one JSON object a line): {e}"
        ) from e
    runs = len(all_runs)
    if not -runs <= args.run < runs:
        raise UsageError(
            f"--run {args.run}: {str(path)!r} holds {runs} run(s), 0 to {runs - 1} "
            "(or -1 for the last)"
        )
    index = args.run % runs
    chosen = all_runs[index]
    header, records = chosen.header, chosen.records
    torn = chosen.torn_message(str(path), index)
    if torn is not None:  # a torn last line: the intact records are reported, and that is said
        print(f"curvscope report: warning: {_one_line(torn)}", file=sys.stderr)
    if runs > 1:  # the page is of one run: say which, and how to see the others
        print(
            f"curvscope report: {str(path)!r} holds {runs} runs; reporting run {index} "
            f"(--run 0 to {runs - 1} picks another)",
            file=sys.stderr,
        )
    if not records or not all(isinstance(r, dict) and "step" in r for r in records):
        if runs > 1 or not records:  # a Monitor's header, and no probe after it
            which = f"run {index} of the {runs} in" if runs > 1 else "the run in"
            raise UsageError(
                f"{which} {str(path)!r} has no probe records yet (killed before its first "
                "probe, or still running): "
                + ("pick another with --run" if runs > 1 else "report it once a probe is logged")
            )
        raise UsageError(f"{str(path)!r} has no probe records with a 'step': is it a Monitor log?")
    out = _writable(Path(args.out))
    with _refusals(f"cannot render the run log {str(path)!r}: "), _writing(out):
        report = write_log_report(header, records, out, run=(index, runs))
    print(f"wrote {report}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``PROG: error: MESSAGE``, exit status 2 (its own
    convention, without the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _version() -> str:
    """curvscope's version and the torch it runs on (what a bug report needs)."""
    import torch

    from curvscope import __version__

    return f"curvscope {__version__} (torch {torch.__version__})"


def parser() -> argparse.ArgumentParser:
    debug = "on an error, show the full traceback"
    common = _Parser(add_help=False)  # a subcommand's --debug: unset unless given (SUPPRESS),
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    ap = _Parser(prog="curvscope", description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--debug", action="store_true", help=debug)  # so it may come first too
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True)
    lab = sub.add_parser(
        "lab",
        parents=[common],
        help="run optimizers side by side on the built-in problems",
        description="Run every optimizer (or --optimizers) on the built-in problems (or "
        "--problems) with the same stated budget, and write results.json, PNG plots and a "
        "self-contained report.html into --out.",
    )
    lab.add_argument(
        "--out", type=folder, default="curvscope-lab", help="output folder (default %(default)s)"
    )
    lab.add_argument("--quick", action="store_true", help="small budgets (a smoke test, ~20 s)")
    lab.add_argument(
        "--problems", type=name_list, help="comma-separated problem names (default: built-ins)"
    )
    lab.add_argument(
        "--optimizers", type=name_list, help="comma-separated optimizer names (default: all)"
    )
    lab.set_defaults(func=_lab)
    pr = sub.add_parser(
        "probe",
        parents=[common],
        help="diagnose a model",
        description="Diagnose a model. --model and --data IMPORT AND RUN your code. Runs under "
        "torchrun --nproc_per_node=N (built-in problems are sharded by rank).",
    )
    pr.add_argument("--problem", help="a built-in model problem, e.g. digits-mlp")
    pr.add_argument(
        "--model", help="pkg.module:factory returning the nn.Module (imports your code)"
    )
    pr.add_argument("--data", help="pkg.module:factory returning (inputs, targets) or a loader")
    pr.add_argument(
        "--loss",
        help="pkg.module:factory returning the loss (default: a Hugging Face model's own loss, "
        "else CrossEntropy)",
    )
    pr.add_argument(
        "--checkpoint", help="a state_dict file for --model, loaded safely (tensors only)"
    )
    pr.add_argument(
        "--lr", type=positive_float, help="judge stability against gradient descent at this lr"
    )
    pr.add_argument(
        "--optimizer",
        choices=("gd", "momentum", *ADAPTIVE),
        help="judge against this optimizer's stability limit: gd or momentum (with --lr; "
        "momentum's β is 0.9 unless --momentum says otherwise), adam or adamw (with "
        "--optimizer-state)",
    )
    pr.add_argument(
        "--reduction",
        choices=("mean", "sum"),
        help="whether --loss averages or sums over a batch's samples, where that cannot be read "
        "from the loss (a function) or told from its values",
    )
    pr.add_argument(
        "--momentum",
        type=momentum_beta,
        metavar="BETA",
        help="β of --optimizer momentum (default 0.9): its stability limit is 2(1 + β)/lr",
    )
    pr.add_argument(
        "--optimizer-state",
        metavar="FILE",
        help="the optimizer's state_dict, torch.save(optimizer.state_dict(), FILE) (loaded "
        "safely); its learning rates are used unless --lr is given",
    )
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.add_argument(
        "--report", type=folder, help="write an HTML report with loss slices into this folder"
    )
    pr.set_defaults(func=_probe)
    rp = sub.add_parser(
        "report",
        parents=[common],
        help="render a Monitor run log as HTML",
        description="Render a run log a Monitor wrote (cs.Monitor(..., log=FILE)) as a "
        "self-contained report.html with its plots, into --out.",
    )
    rp.add_argument("log", help="the run log written by cs.Monitor(log=...)")
    rp.add_argument(
        "--out", type=folder, default="curvscope-report", help="output folder (default %(default)s)"
    )
    rp.add_argument(
        "--run",
        type=int,
        default=-1,
        help="which run of a log holding several (log_mode='a'): 0 the first, -1 the last",
    )
    rp.set_defaults(func=_report)
    return ap


class _Stop:
    """How a command was stopped: Ctrl-C (SIGINT), or SIGTERM — what ``timeout``, SLURM,
    ``docker stop`` and Kubernetes send, which ended the lab at once and lost every finished
    run (an outside review) — turned into the same KeyboardInterrupt while a command runs, so
    that both keep what Ctrl-C keeps. The word and the shell's status for each."""

    signal: str | None = None

    @classmethod
    def word(cls) -> str:
        return "terminated (SIGTERM)" if cls.signal == "SIGTERM" else "interrupted"

    @classmethod
    def status(cls) -> int:
        return 128 + signal.SIGTERM if cls.signal == "SIGTERM" else 130


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the command runs (in the main thread only, where
    Python delivers signals, and not where the parent set it to be ignored, as Python leaves an
    ignored SIGINT); the previous handler is put back after."""
    ignored = signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # a parent's choice: kept
    if ignored or threading.current_thread() is not threading.main_thread():
        yield
        return
    _Stop.signal = None

    def stop(signum: int, frame: Any) -> None:
        _Stop.signal = "SIGTERM"
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for a user error, 130 after Ctrl-C,
    143 after SIGTERM)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its one line (or --help)
        return e.code if isinstance(e.code, int) else 2
    try:
        with _sigterm_as_interrupt():
            return int(args.func(args))
    except UsageError as e:
        if args.debug:
            raise
        print(f"curvscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of the output went away (`| head`): nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: the shell's status for it
    except OSError as e:
        # a system call's error about a path or a disk, which the user can fix (a name too long
        # gave a traceback); one without an errno is no such thing: raised
        if args.debug or e.errno is None:
            raise
        where = f" ({e.filename!r})" if e.filename else ""
        print(f"curvscope {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: one line, the shell's status for it
        if args.debug:
            raise
        print(
            f"curvscope {args.command}: {_Stop.word()}; nothing more was written", file=sys.stderr
        )
        return _Stop.status()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
