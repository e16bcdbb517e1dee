"""Two processes on CPU (gloo, loopback): products, eigenvalues, trace and the diagnosis over
uneven data shards equal the single-process results on the full data; a DDP-wrapped model is
left untouched; a rank that dies ends the other's product with a clear error, not a hang."""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvscope as cs
from curvscope.diagnosis.classify import effective_sharpness
from curvscope.diagnosis.monitor import read_log
from tests import cases

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
SHARDS = (slice(0, 13), slice(13, 20))  # uneven: 13 and 7 samples
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, tmp_path: Path, nprocs: int) -> list[dict]:
    """``worker(rank, port, out)`` on ``nprocs`` spawned processes, each saving its results as
    ``out/rank{rank}.pt``; returns them in rank order."""
    mp.start_processes(
        worker, args=(_free_port(), str(tmp_path)), nprocs=nprocs, start_method="spawn"
    )
    return [torch.load(Path(tmp_path) / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=20))


def _measure(model, loss_fn, data) -> dict:
    C = cs.Curvature(model, loss_fn, data)
    v = torch.randn(C.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = cs.eigenvalues(C, k=2, which="both", tol=1e-8)
    t = cs.trace(C, matvecs=30, method="hutch++")
    d = cs.diagnose(model, loss_fn, data, lr=0.5)
    loss, g = C.loss_and_gradient()
    return {
        "hv": C @ v,
        "eig": r.values,
        "trace": torch.tensor(t.value),
        "loss": torch.tensor(loss),
        "grad": g,
        "state": d.state,
        "sharpness": torch.tensor(d.evidence["sharpness"]),
    }


def _worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    case = cases.mlp(n=20)
    X, y = case.data
    s = SHARDS[rank]
    # the shard as a list of two uneven batches, as a loader would give it
    local = [(X[s][:4], y[s][:4]), (X[s][4:], y[s][4:])]
    ddp = torch.nn.parallel.DistributedDataParallel(case.model)
    result = _measure(ddp, case.loss_fn, local)
    result["grads_untouched"] = all(p.grad is None for p in ddp.parameters())
    # a DataLoader with a DistributedSampler (20 samples: even shards, so no padding)
    sampler = torch.utils.data.DistributedSampler(
        torch.utils.data.TensorDataset(X, y), shuffle=False
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=4, sampler=sampler
    )
    v = torch.randn(
        result["hv"].numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    result["hv_sampler"] = cs.Curvature(ddp, case.loss_fn, loader) @ v
    # the Monitor in a DDP loop: every rank probes, only rank 0 writes the log; the cheap tier
    # between probes (it keyed the parameters by DDP's names, module.*, and raised a KeyError)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    mon = cs.Monitor(
        ddp,
        case.loss_fn,
        local,
        optimizer=opt,
        every=4,
        update_every=1,
        log=str(Path(out) / "run.jsonl"),
    )
    for xb, yb in local * 4:
        opt.zero_grad()
        loss = case.loss_fn(ddp(xb), yb)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    result["monitor_states"] = [d.state for d in mon.history]
    result["checks"] = len(mon.updates)
    # a collective: the loss over every rank's probe data (it did nothing under a process
    # group, and the Trainer callback's blown-up run read learning: a review)
    fresh = cs.Monitor(ddp, case.loss_fn, local, lr=0.1, every=4)
    result["first_loss"] = fresh.measure_first_loss()
    result["loss_now"] = cs.Curvature(ddp, case.loss_fn, local).loss_and_gradient()[0]
    # a bfloat16 model's loss computed in float32 is summed over the ranks unrounded
    half = copy.deepcopy(case.model).to(torch.bfloat16)
    halves = [(xb.to(torch.bfloat16), yb) for xb, yb in local]

    def upcast(o, t):
        return torch.nn.functional.cross_entropy(o.float(), t)

    loss, grad = cs.Curvature(half, upcast, halves).loss_and_gradient()
    own = [(float(upcast(half(xb), yb)), len(yb)) for xb, yb in halves]
    result["half"] = (loss, grad.dtype, own)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


def _end() -> None:
    """Leave together, then skip the interpreter's teardown: gloo's threads (and DDP's) can
    abort a process that exits while they wind down, which would fail the test for nothing."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)


def _load(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


def test_two_ranks_equal_one_process_on_the_full_data(tmp_path):
    case = cases.mlp(n=20)
    reference = _measure(case.model, case.loss_fn, case.data)
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["grads_untouched"]
        assert got["state"] == reference["state"]
        for key in ("hv", "eig", "trace", "loss", "grad", "sharpness"):
            torch.testing.assert_close(got[key], reference[key], rtol=1e-10, atol=1e-12)
        assert len(got["monitor_states"]) == 2
        assert got["checks"] >= 1
        assert got["first_loss"] == pytest.approx(got["loss_now"], rel=1e-12)
        half_loss, half_dtype, _ = got["half"]
        batches = [b for r in range(WORLD) for b in _load(tmp_path, r)["half"][2]]
        mean = sum(value * n for value, n in batches) / sum(n for _, n in batches)
        assert half_dtype == torch.bfloat16 and half_loss == pytest.approx(mean, rel=1e-6)
        torch.testing.assert_close(got["hv_sampler"], reference["hv"], rtol=1e-10, atol=1e-12)
    _, records = read_log(tmp_path / "run.jsonl")
    assert [r["step"] for r in records] == [4, 8]  # written once, by rank 0


def _summed_steps(rank: int) -> list:
    """Rank ``rank``'s training batches (two uneven ones of its shard)."""
    X, y = cases.mlp(n=20).data
    s = SHARDS[rank]
    return [(X[s][:4], y[s][:4]), (X[s][4:], y[s][4:])]


def _summed_worker(rank: int, port: int, out: str) -> None:
    """A summed loss under DDP: the gradient a step takes, and the diagnosis."""
    _init(rank, port)
    case = cases.mlp(n=20)
    ddp = torch.nn.parallel.DistributedDataParallel(case.model)
    summed = torch.nn.CrossEntropyLoss(reduction="sum")
    local = _summed_steps(rank)
    X, y = case.data
    summed(ddp(X[SHARDS[rank]]), y[SHARDS[rank]]).backward()  # what DDP's step takes
    step = torch.cat([p.grad.flatten() for p in ddp.parameters()])
    ddp.zero_grad(set_to_none=True)
    full = cs.diagnose(ddp, summed, local, lr=0.05)
    batches = cs.diagnose(ddp, summed, local, lr=0.05, train_batches=local)
    torch.save({"step": step, "full": full, "batches": batches}, Path(out) / f"sum{rank}.pt")
    _end()


def test_a_summed_loss_under_ddp_is_judged_by_the_averaged_step(tmp_path):
    """DDP averages the ranks' gradients, so a step on a summed loss is 1/R of the gradient of
    the sum over every rank's samples, which is what the operator is: the diagnosis judged the
    sum's curvature as the step's, R times too sharp, with and without training batches (stop
    39's review). It scales by 1/R now: each rank's verdict, stable rate and effective
    sharpness are a single process's on the full data with the sum halved — the loss whose
    gradient DDP's step takes (checked here too)."""
    mp.start_processes(
        _summed_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    case = cases.mlp(n=20)

    def halved(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, t, reduction="sum") / WORLD

    model, (X, y) = case.model, case.data
    halved(model(X), y).backward()
    step = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    steps = [
        (
            torch.cat([_summed_steps(r)[i][0] for r in range(WORLD)]),
            torch.cat([_summed_steps(r)[i][1] for r in range(WORLD)]),
        )
        for i in range(2)
    ]
    full = cs.diagnose(model, halved, case.data, lr=0.05, reduction="sum")
    batches = cs.diagnose(model, halved, case.data, lr=0.05, reduction="sum", train_batches=steps)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"sum{rank}.pt", weights_only=False)
        torch.testing.assert_close(got["step"], step, rtol=1e-12, atol=1e-14)
        for mine, ref in ((got["full"], full), (got["batches"], batches)):
            assert mine.state == ref.state
            assert mine.evidence.step_share * WORLD == pytest.approx(ref.evidence.step_share or 1)
            for key in ("stable_lr", "batch_sharpness"):
                if ref.evidence.get(key) is None:
                    assert mine.evidence.get(key) is None
                else:
                    assert mine.evidence[key] == pytest.approx(ref.evidence[key], rel=1e-6)
            assert effective_sharpness(mine.evidence) == pytest.approx(
                effective_sharpness(ref.evidence), rel=1e-6
            )


def _dying_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    case = cases.mlp(n=20)
    X, y = case.data
    C = cs.Curvature(case.model, case.loss_fn, (X[SHARDS[rank]], y[SHARDS[rank]]))
    if rank == 1:
        os._exit(0)  # dies without a word, as a crashed or killed rank does
    start = time.perf_counter()
    try:
        C @ torch.ones(C.num_params, dtype=torch.float64)
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    (Path(out) / "rank0.txt").write_text(f"{time.perf_counter() - start:.1f}\n{message}")
    os._exit(0)  # the group is broken: no barrier, no teardown


def test_a_failed_rank_ends_the_others_with_a_clear_error(tmp_path):
    ctx = mp.start_processes(
        _dying_worker,
        args=(_free_port(), str(tmp_path)),
        nprocs=WORLD,
        start_method="spawn",
        join=False,
    )
    deadline = time.time() + 90
    while not ctx.join(timeout=1):
        assert time.time() < deadline, "a rank hung"
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "curvscope: the all-reduce over 2 ranks failed" in message
    assert float(seconds) <= 25  # the peer's closed connection, or the 20 s group timeout


def _mismatched_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    case = cases.mlp(n=20) if rank == 0 else cases.mlp_mse(n=20)  # another model on rank 1
    X, y = case.data
    try:
        cs.Curvature(case.model, case.loss_fn, (X[SHARDS[rank]], y[SHARDS[rank]]))
        message = "no error"
    except ValueError as e:
        message = str(e)
    (Path(out) / f"rank{rank}.txt").write_text(message)
    _end()


def _nan_shard_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    case = cases.mlp(n=20)
    X, y = case.data
    X = X[SHARDS[rank]].clone()
    if rank == 1:
        X[0, 0] = float("nan")  # only rank 1's shard of the data is bad
    start = time.perf_counter()
    try:
        cs.Curvature(case.model, case.loss_fn, (X, y[SHARDS[rank]]))
        message = "no error"
    except ValueError as e:
        message = str(e)
    (Path(out) / f"rank{rank}.txt").write_text(f"{time.perf_counter() - start}\n{message}")
    _end()


def test_data_refused_on_one_rank_stops_every_rank_at_once(tmp_path):
    """Before: rank 1 raised, rank 0 waited in the 'every rank builds the same operator'
    check until the process group's timeout (20 s here, 30 min by default)."""
    mp.start_processes(
        _nan_shard_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    said = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in range(WORLD)]
    assert "contains NaN or Inf" in said[1][1]
    assert "rank 1 failed (this is rank 0)" in said[0][1]
    assert max(float(seconds) for seconds, _ in said) < 10


def test_ranks_that_build_different_operators_get_the_same_clear_error(tmp_path):
    """Before: rank 1 died with SIGABRT (gloo's collective mismatch), rank 0 blamed a peer."""
    mp.start_processes(
        _mismatched_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    for m in messages:
        assert m.startswith("the ranks built different curvature operators: num_params")
        assert "Every rank must build the same Curvature" in m
    assert "num_params=43" in messages[0] and "num_params=38" in messages[1]


def test_probe_under_torchrun_matches_one_process(tmp_path):
    import json
    import subprocess
    import sys

    argv = [
        "-m",
        "curvscope.cli",
        "probe",
        "--problem",
        "breast-cancer-logreg",
        "--lr",
        "0.5",
        "--json",
    ]
    one = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=120, check=True
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert two.returncode == 0, "\n".join(
        ln for ln in two.stderr.splitlines() if "Warning" not in ln and "*****" not in ln
    )[:6000]
    a = json.loads(one.stdout)
    lines = [ln for ln in two.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    b = json.loads(lines[0])
    assert b["world_size"] == 2 and a["world_size"] == 1 and a["state"] == b["state"]
    for key in ("eigenvalues", "trace"):
        torch.testing.assert_close(
            torch.tensor(b[key]), torch.tensor(a[key]), rtol=1e-9, atol=1e-12
        )


def test_group_without_a_process_group_is_a_clear_error():
    case = cases.mlp()
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        cs.Curvature(case.model, case.loss_fn, case.data, group=True)
    C = cs.Curvature(case.model, case.loss_fn, case.data, group=False)
    assert C.group is None


def _average_gradients(model: torch.nn.Module) -> None:
    """What DDP does: every rank steps on the ranks' mean gradient, so the models stay one
    (the ranks compare the parameters' values when they build an operator)."""
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= WORLD


def _cadence_worker(rank: int, port: int, out: str) -> None:
    """The default (adaptive) cadence on two ranks whose loops run at different speeds: the
    ranks agree on their timings at each probe and check, so they probe and check at the same
    steps (a probe's products are collectives: a rank probing alone would hang)."""
    _init(rank, port)
    case = cases.mlp(n=20)
    X, y = case.data
    local = (X[SHARDS[rank]], y[SHARDS[rank]])
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    cs.diagnose(case.model, case.loss_fn, local, lr=0.1)  # one-time initialisation, untimed
    mon = cs.Monitor(case.model, case.loss_fn, local, optimizer=opt, overhead=0.5)
    probes = []
    for _ in range(150):
        time.sleep(0.004 if rank == 0 else 0.02)  # rank 1's loop is five times slower
        opt.zero_grad()
        loss = case.loss_fn(case.model(local[0]), local[1])
        loss.backward()
        _average_gradients(case.model)
        opt.step()
        if mon.step(loss) is not None:
            probes.append(mon.steps)
    torch.save({"probes": probes, "checks": [k for k, _ in mon.updates]}, Path(out) / f"c{rank}.pt")
    _end()


def test_the_default_cadence_probes_at_the_same_steps_on_every_rank(tmp_path):
    mp.start_processes(
        _cadence_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    got = [torch.load(tmp_path / f"c{rank}.pt") for rank in range(WORLD)]
    assert got[0] == got[1]
    assert got[0]["probes"][0] == 10 and len(got[0]["probes"]) + len(got[0]["checks"]) >= 3


def _clip_worker(rank: int, port: int, out: str) -> None:
    """Ranks whose clipping left different shares of the gradient (rank 0: 0.5, rank 1: 0.25)
    judge by one limit, rank 0's: a probe (and a cheap check's alarm, which calls one) is a
    collective, and ranks that judged different limits would call them at different steps."""
    _init(rank, port)
    case = cases.mlp(n=20)
    local = (case.data[0][SHARDS[rank]], case.data[1][SHARDS[rank]])
    mon = cs.Monitor(case.model, case.loss_fn, local, lr=0.1, every=2, max_grad_norm=1.0)
    for _ in range(4):
        mon.step(1.0, grad_norm=2.0 if rank == 0 else 4.0)
    limits = [(d.evidence["clip_factor"], d.evidence["stability_limit"]) for d in mon.history]
    torch.save(limits, Path(out) / f"clip{rank}.pt")
    _end()


def test_ranks_judge_clipped_steps_by_one_clip_factor(tmp_path):
    mp.start_processes(
        _clip_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    got = [torch.load(tmp_path / f"clip{rank}.pt") for rank in range(WORLD)]
    assert got[0] == got[1] and len(got[0]) == 2
    assert all(c == pytest.approx(0.5, rel=1e-5) for c, _ in got[0])
    assert all(lim == pytest.approx(2 / (0.1 * 0.5), rel=1e-5) for _, lim in got[0])


def _one_rank_diverges_worker(rank: int, port: int, out: str) -> None:
    """Rank 1's probe data overflows (a target of 1e20 in float32, squared): its loss alone is
    not finite. And rank 1's reported training loss spikes 50x at two steps."""
    _init(rank, port)
    case = cases.mlp(n=20)
    X, y = case.data
    model = case.model.float()
    local = (X[SHARDS[rank]].float(), y[SHARDS[rank]])
    start = time.perf_counter()
    bad_y = torch.randn(len(local[0]), 3)
    if rank == 1:
        bad_y[0, 0] = 1e20
    d = cs.diagnose(model, torch.nn.MSELoss(), (local[0], bad_y), lr=0.1)
    try:  # a loss of inf whose gradient is finite: products alone came out "converged"
        G = cs.Curvature(model, torch.nn.MSELoss(), (local[0], bad_y), kind="ggn")
        products = f"converged: {cs.eigenvalues(G).all_converged}"
    except FloatingPointError as e:
        products = f"refused: {e}"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = cs.Monitor(model, case.loss_fn, local, optimizer=opt, every=4)
    states, seen = [], []
    mon.callback = lambda d, previous: seen.append(d.state.value)
    for step in range(12):
        opt.zero_grad()
        loss = case.loss_fn(model(local[0]), local[1])
        loss.backward()
        _average_gradients(model)
        opt.step()
        reported = float(loss) * (50.0 if rank == 1 and step in (5, 6) else 1.0)
        probe = mon.step(reported)
        if probe is not None:
            states.append(probe.state.value)
    torch.save(
        {
            "diagnose": d.state.value,
            "products": products,
            "seconds": time.perf_counter() - start,
            "monitor": states,
            "callback": seen,
            "first_loss": mon.first_loss,
        },
        Path(out) / f"rank{rank}.pt",
    )
    _end()


def test_one_ranks_bad_data_or_loss_gives_every_rank_the_same_verdict(tmp_path):
    """A probe whose loss was not finite on one rank's data alone: that rank said *diverged*
    and went on to the verdict's broadcast while the others waited in the loss's sum — a hang
    until the group's timeout (30 min by default), or gloo aborting the process. And a Monitor
    whose ranks reported different training losses returned *diverged* on one rank, *learning*
    on the other, its callback firing on one (an outside review). Now the loss's NaN reaches
    every rank through the sum, and the training losses are the ranks' mean at each probe."""
    got = run_ranks(_one_rank_diverges_worker, tmp_path, WORLD)
    assert got[0]["diagnose"] == got[1]["diagnose"] == "diverged"
    assert all(g["products"].startswith("refused: the ggn product summed over") for g in got)
    assert got[0]["first_loss"] == got[1]["first_loss"]  # the ranks' mean, on each
    assert max(g["seconds"] for g in got) < 15
    assert got[0]["monitor"] == got[1]["monitor"] and got[0]["callback"] == got[1]["callback"]


def _one_rank_nan_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 reports a NaN training loss at its sixth step, under a cadence that plans no
    probe before step 1000; rank 0's losses stay finite."""
    _init(rank, port)
    case = cases.mlp(n=20)
    local = (case.data[0][SHARDS[rank]], case.data[1][SHARDS[rank]])
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    mon = cs.Monitor(case.model, case.loss_fn, local, optimizer=opt, every=1000)
    seen: list[tuple[int, str]] = []
    mon.callback = lambda d, previous: seen.append((mon.steps, d.state.value))
    for step in range(10):
        opt.zero_grad()
        loss = case.loss_fn(case.model(local[0]), local[1])
        loss.backward()
        _average_gradients(case.model)
        opt.step()
        mon.step(math.nan if rank == 1 and step == 5 else loss)
    mon.close()
    states = [d.state.value for d in mon.history]
    history = list(zip(mon.probe_steps, mon.probe_causes, states, strict=True))
    torch.save({"history": history, "callback": seen}, Path(out) / f"rank{rank}.pt")
    _end()


def test_a_nan_loss_on_one_rank_calls_a_probe_on_every_rank(tmp_path):
    """Under torch.distributed the loss watch read each rank's loss alone and called no probe
    (a probe is a collective), so a NaN on one rank waited for the next planned probe —
    hundreds of steps at the default cadence (an outside review). Each step's verdict of the
    loss watch now reaches every rank at the next step: both probe there and say *diverged*."""
    got = run_ranks(_one_rank_nan_worker, tmp_path, WORLD)
    assert got[0] == got[1]
    assert got[0]["history"] == [(7, "loss", "diverged")]
    assert got[0]["callback"] == [(7, "diverged")]


def _ignored_on_one_rank_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(rank + 1)
    X, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,))
    if rank == 0:
        y[::3] = -100  # ignored labels on rank 0's data only

    def loss_fn(out, t):
        return torch.nn.functional.cross_entropy(out, t, ignore_index=-100)

    data = [(X[:8], y[:8]), (X[8:], y[8:])]
    start = time.perf_counter()
    said = {}

    def attempt(name, call):
        try:
            call()
            said[name] = "no error"
        except (ValueError, FloatingPointError) as e:
            said[name] = f"{type(e).__name__}: {e}"

    C = cs.Curvature(model, loss_fn, data, reduction="mean")
    attempt("product", lambda: C @ torch.ones(C.num_params, dtype=torch.float64))
    attempt("gradient", C.loss_and_gradient)
    attempt("diagnose", lambda: cs.diagnose(model, loss_fn, data, lr=0.1, reduction="mean"))
    inferred = cs.Curvature(model, loss_fn, data)  # its reduction inferred: refused as well
    attempt("inferred", lambda: inferred @ torch.ones(C.num_params, dtype=torch.float64))
    fd = cs.Curvature(model, loss_fn, data, reduction="mean", backend="finite_difference")
    attempt("finite_difference", lambda: fd @ torch.ones(C.num_params, dtype=torch.float64))
    said["seconds"] = time.perf_counter() - start
    torch.save(said, Path(out) / f"rank{rank}.pt")
    _end()


def _linear_loss_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    case = cases.mlp_mse(n=16)
    X, y = case.data
    far = y + 100.0  # every residual past Huber's delta: the loss is linear in the outputs there
    huber = torch.nn.HuberLoss(delta=10.0)
    shards = [(X[:8], far[:8]), (X[8:], y[8:])]  # rank 0's data: a GGN of 0 of its own
    said = {}
    C = cs.Curvature(case.model, huber, shards[rank], kind="ggn")
    v = torch.randn(C.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    said["product"], said["again"] = C @ v, C @ v
    whole = cs.Curvature(case.model, huber, shards, kind="ggn", group=False)
    said["reference"] = whole @ v
    torch.manual_seed(0)  # the same head on every rank
    nll = cs.Curvature(
        torch.nn.Sequential(case.model, torch.nn.Linear(2, 3).double(), torch.nn.LogSoftmax(-1)),
        torch.nn.NLLLoss(),
        (X[rank * 8 : rank * 8 + 8], torch.arange(8) % 3),
        kind="ggn",
    )
    try:
        cs.eigenvalues(nll)
        said["nll"] = "no error"
    except ValueError as e:
        said["nll"] = f"ValueError: {e}"
    torch.save(said, Path(out) / f"rank{rank}.pt")
    _end()


def test_a_gauss_newton_of_0_is_refused_only_when_no_ranks_loss_curves(tmp_path):
    """The GGN's check that its loss curves in the outputs was made in one process only: one
    rank's data alone (residuals past Huber's delta) is no reason to refuse, but NLLLoss after
    LogSoftmax on every rank gave a GGN of 0 under a process group, λ_max 0 "converged",
    without a word. The ranks decide together at the first product's sum."""
    got = run_ranks(_linear_loss_worker, tmp_path, WORLD)
    for g in got:
        assert torch.allclose(g["product"], g["reference"], rtol=1e-12, atol=1e-14)
        assert torch.equal(g["product"], g["again"]) and g["product"].abs().max() > 0
        assert g["nll"].startswith("ValueError: the Gauss-Newton matrix is 0")


def test_a_mean_refused_on_one_ranks_data_stops_every_rank_at_once(tmp_path):
    """The checks of a loss inside a product run on each rank's data: a function ignoring
    labels held only by rank 0's data raised there, and rank 1 waited in the product's sum
    until the group's timeout; then rank 1 read the NaN as *diverged* (diagnose, the Monitor,
    whose next collective hung), and the finite-difference backend accepted it, 25% off (two
    reviews). Every rank now raises a ValueError at once — rank 0 its reason, rank 1 that a
    rank's data was refused — at every product, gradient and diagnosis, and when the
    reduction is inferred."""
    got = run_ranks(_ignored_on_one_rank_worker, tmp_path, WORLD)
    for name in ("product", "gradient", "diagnose"):
        assert got[0][name].startswith("ValueError: loss_fn is a mean, but not over the rows")
        assert got[1][name].startswith("ValueError: the data of 1 other rank(s) was refused")
    assert got[0]["inferred"].startswith("ValueError: loss_fn does not declare its reduction")
    assert got[1]["inferred"].startswith("ValueError: the data of 1 other rank(s) was refused")
    assert got[0]["finite_difference"].startswith("ValueError: loss_fn is a mean, but not")
    assert got[1]["finite_difference"].startswith("ValueError: rank 0 failed")
    assert max(g["seconds"] for g in got) < 15
