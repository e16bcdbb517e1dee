"""``curvscope lab | probe | report``: thin commands over the lab, the diagnosis and the report.

Errors a user can fix (an unknown name, a module that does not import, an unwritable output
folder, a corrupt run log) print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _names(arg: str | None) -> list[str] | None:
    return [a.strip() for a in arg.split(",") if a.strip()] if arg else None


def _writable(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".curvscope-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to the output folder {str(out)!r}: {e.strerror}; "
            "choose another with --out"
        ) from e
    return out


def _import(spec: str, what: str) -> Any:
    """``pkg.module:attr`` -> the attribute (this imports and runs the user's module)."""
    if ":" not in spec:
        raise UsageError(f"{what} must look like pkg.module:name, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # the user's module: any import failure is a usage error
        raise UsageError(f"cannot import {mod_name!r} for {what}: {type(e).__name__}: {e}") from e
    finally:
        sys.path.pop(0)
    if not hasattr(mod, attr):
        raise UsageError(f"{mod_name!r} has no attribute {attr!r} (for {what})")
    return getattr(mod, attr)


# ------------------------------------------------------------------------------------ lab
def _lab(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from curvscope import lab, report

    try:
        problem_names, optimizer_names = lab.selection(
            _names(args.problems), _names(args.optimizers)
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    out = _writable(Path(args.out))
    console = Console(width=None if sys.stdout.isatty() else 110)
    budget = lab.QUICK if args.quick else lab.Budget()
    n_runs = len(problem_names) * len(optimizer_names)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("lab", total=n_runs)

        def on_run(run: lab.Run) -> None:
            bar.update(task, advance=1, description=f"{run.problem}: {run.optimizer}")

        results = lab.run_lab(problem_names, optimizer_names, budget=budget, on_run=on_run)
    path = report.write_lab(results, out)
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
    console.print(table)
    console.print(f"wrote {out / 'results.json'} and {path} in {results['seconds']:.1f} s")
    return 0


# ---------------------------------------------------------------------------------- probe
def _probe(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) the process group is started here — gloo on CPU, NCCL
    when CUDA is there — and ended here once every rank is done (a rank that exits with the
    group alive aborts in gloo's threads)."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        return _probe_on_rank(args, dist.get_rank() if world > 1 else 0, world)
    finally:
        if started:
            dist.barrier()
            dist.destroy_process_group()


def _probe_on_rank(args: argparse.Namespace, rank: int, world: int) -> int:
    import torch

    from curvscope import problems
    from curvscope.lab.probe import probe

    if args.problem:
        try:
            p = problems.get(args.problem)
        except ValueError as e:
            raise UsageError(str(e)) from e
        if not isinstance(p, problems.ModelProblem):
            raise UsageError(
                f"--problem needs a model problem, got the function {args.problem!r}; "
                "model problems: "
                + ", ".join(
                    n
                    for n in problems.names()
                    if isinstance(problems.get(n), problems.ModelProblem)
                )
            )
        model, loss_fn, (X, y) = p.make_model(0), p.loss_fn, p.data
        data = (X[rank::world], y[rank::world])  # this rank's shard (all of it in one process)
    else:
        if not (args.model and args.data):
            raise UsageError(
                "give --problem NAME, or --model pkg.module:factory and "
                "--data pkg.module:loader_factory"
            )
        model = _import(args.model, "--model")()
        data = _import(args.data, "--data")()
        loss_fn = _import(args.loss, "--loss")() if args.loss else torch.nn.CrossEntropyLoss()
        if args.checkpoint:
            try:
                state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
            except Exception as e:
                raise UsageError(f"cannot load the checkpoint {args.checkpoint!r}: {e}") from e
            model.load_state_dict(state)
    optimizer = None
    if args.optimizer:
        if args.lr is None:
            raise UsageError("--optimizer needs --lr")
        from curvscope import optim

        if args.optimizer not in ("gd", "momentum"):
            raise UsageError(f"--optimizer must be gd or momentum, got {args.optimizer!r}")
        optimizer = optim.build(args.optimizer, model.parameters(), lr=args.lr)
    lr = args.lr if optimizer is None else None
    out = _writable(Path(args.report)) if args.report else None
    result = probe(model, loss_fn, data, lr=lr, optimizer=optimizer, slices=out is not None)
    result["world_size"] = world
    if rank != 0:  # every rank computed the same numbers; one speaks
        return 0
    if out is not None:
        from curvscope.report.html import write_probe_report

        result["report"] = str(write_probe_report(result, out))
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    n, mb = result["num_params"], result["dense_hessian_bytes"] / 2**20
    print(result["text"])
    print(
        f"extreme eigenvalues: {', '.join(f'{v:.4g}' for v in result['eigenvalues'])}; "
        f"trace ≈ {result['trace']:.4g} ± {result['trace_stderr']:.2g}"
    )
    print(
        f"cost: {result['matvecs']} curvature products in {result['seconds']:.2f} s; the dense "
        f"Hessian of {n:,} parameters would need {mb:,.1f} MiB (8n² bytes)"
    )
    if out is not None:
        print(f"wrote {result['report']}")
    return 0


# --------------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    from curvscope.diagnosis.monitor import read_log
    from curvscope.report import write_log_report

    path = Path(args.log)
    if not path.is_file():
        raise UsageError(f"no run log at {str(path)!r}")
    try:
        header, records = read_log(path)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UsageError(
            f"{str(path)!r} is not a curvscope run log (one JSON object a line): {e}"
        ) from e
    if not records or not all(isinstance(r, dict) and "step" in r for r in records):
        raise UsageError(f"{str(path)!r} has no probe records with a 'step': is it a Monitor log?")
    out = _writable(Path(args.out))
    print(f"wrote {write_log_report(header, records, out)}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="curvscope", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="run optimizers side by side on the built-in problems")
    lab.add_argument("--out", default="curvscope-lab", help="output folder (default %(default)s)")
    lab.add_argument("--quick", action="store_true", help="small budgets (a smoke test, ~20 s)")
    lab.add_argument("--problems", help="comma-separated problem names (default: the built-ins)")
    lab.add_argument("--optimizers", help="comma-separated optimizer names (default: all)")
    lab.set_defaults(func=_lab)
    pr = sub.add_parser(
        "probe",
        help="diagnose a model",
        description="Diagnose a model. --model and --data IMPORT AND RUN your code. Runs under "
        "torchrun --nproc_per_node=N (built-in problems are sharded by rank).",
    )
    pr.add_argument("--problem", help="a built-in model problem, e.g. digits-mlp")
    pr.add_argument(
        "--model", help="pkg.module:factory returning the nn.Module (imports your code)"
    )
    pr.add_argument("--data", help="pkg.module:factory returning (inputs, targets) or a loader")
    pr.add_argument("--loss", help="pkg.module:factory returning the loss (default CrossEntropy)")
    pr.add_argument("--checkpoint", help="a state_dict file, loaded with weights_only=True")
    pr.add_argument("--lr", type=float, help="judge stability against gradient descent at this lr")
    pr.add_argument("--optimizer", help="gd or momentum (with --lr)")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.add_argument("--report", help="write an HTML report with loss slices into this folder")
    pr.set_defaults(func=_probe)
    rp = sub.add_parser("report", help="render a Monitor run log (JSONL) as HTML")
    rp.add_argument("log", help="the run log written by cs.Monitor(log=...)")
    rp.add_argument("--out", default="curvscope-report", help="output folder")
    rp.set_defaults(func=_report)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"curvscope {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
