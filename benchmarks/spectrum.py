"""Eigenvalues, trace and density: curvscope's defaults against PyHessian, curvlinops (+ scipy
eigsh) and hessian-eigenthings, side by side in one run, products counted by wrapping each
tool's product call.

    python benchmarks/spectrum.py [--quick]

Accuracy is relative error against a high-accuracy reference (curvscope Lanczos at tol 1e-9,
cross-checked against the dense spectrum on the small W1 model). Peers are optional
(``pip install -e '.[bench]'``). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback
from collections.abc import Callable

import torch
from _common import Workload, cnn_w3, markdown_table, mlp_w2
from torch import nn

import curvscope as cs


def mlp_w1() -> Workload:
    """MLP 20-50-50-5 tanh, 512 samples, float64 (3,855 parameters; dense reference)."""
    g = torch.Generator().manual_seed(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = nn.Sequential(
            nn.Linear(20, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 5)
        ).double()
    return Workload(
        "W1 mlp 20-50-50-5 tanh, 512 samples, float64",
        model,
        nn.CrossEntropyLoss(),
        torch.randn(512, 20, generator=g, dtype=torch.float64),
        torch.randint(0, 5, (512,), generator=g),
    )


class Counted:
    """Wraps a product function and counts its calls."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def rel(x: float, ref: float) -> float:
    return abs(x - ref) / abs(ref)


def timed(fn: Callable) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- peers
def _pyhessian_module():
    """pyhessian.hessian the module (the package's ``hessian`` attribute is the class)."""
    import sys

    import pyhessian  # noqa: F401

    return sys.modules["pyhessian.hessian"]


def pyhessian_run(w: Workload, call: Callable):
    """Build PyHessian on the workload and run ``call(hessian_object)``, counting its
    Hessian-vector products; returns (result, products, seconds)."""
    ph = _pyhessian_module()
    counter = Counted(ph.hessian_vector_product)
    ph.hessian_vector_product = counter
    try:
        out, secs = timed(lambda: call(ph.hessian(w.model, w.loss_fn, data=w.data, cuda=False)))
    finally:
        ph.hessian_vector_product = counter.fn
    return out, counter.calls, secs


def pyhessian_eigs(w: Workload, top_n: int):
    vals, calls, secs = pyhessian_run(w, lambda h: h.eigenvalues(top_n=top_n)[0])
    return sorted(vals, reverse=True), calls, secs


def pyhessian_trace(w: Workload):
    return pyhessian_run(w, lambda h: statistics.mean(h.trace()))


def eigenthings_op(w: Workload):
    import hessian_eigenthings as he

    op = he.HessianOperator(w.model, [w.data], lambda m, b: w.loss_fn(m(b[0]), b[1]))
    op.matvec = Counted(op.matvec)
    return op


def eigenthings_eigs(w: Workload, k: int, steps: int, which: str = "LA"):
    import hessian_eigenthings as he

    def run():
        op = eigenthings_op(w)
        r = he.lanczos(op, k=k, max_iter=steps, which=which, seed=0)
        return r, op

    (r, op), secs = timed(run)
    vals = sorted(torch.as_tensor(r.eigenvalues).tolist(), reverse=which != "SA")
    return vals, op.matvec.calls, secs


def eigenthings_density(w: Workload, steps: int):
    import hessian_eigenthings as he

    def run():
        op = eigenthings_op(w)
        he.spectral_density(op, num_runs=1, lanczos_steps=steps, seed=0)
        return op

    op, secs = timed(run)
    return op.matvec.calls, secs


def curvlinops_eigsh(w: Workload, k: int, which: str):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    def run():
        op = HessianLinearOperator(
            w.model, w.loss_fn, list(w.model.parameters()), [w.data], check_deterministic=False
        ).to_scipy()
        counter = Counted(op.matvec)
        op.matvec = counter
        vals = eigsh(op, k=k, which=which, tol=1e-3, return_eigenvectors=False)
        return vals, counter

    (vals, counter), secs = timed(run)
    return sorted(vals.tolist(), reverse=which == "LA"), counter.calls, secs


def try_peer(rows: list, label: str, fn: Callable, ref: list[float]) -> None:
    try:
        vals, mv, secs = fn()
        err = max(rel(v, r) for v, r in zip(vals, ref, strict=False))
        rows.append([label, str(mv), f"{secs:.2f}", f"{err:.1e}"])
    except ImportError as e:
        rows.append([label, "", "", f"not installed ({e.name})"])
    except Exception as e:  # a peer that crashes is a result too
        rows.append([label, "", "", f"failed: {type(e).__name__}: {str(e)[:60]}"])
        traceback.print_exc()


# ------------------------------------------------------------------------ benchmark
def eigen_table(w: Workload, peers: bool) -> str:
    def C():
        return cs.Curvature(w.model, w.loss_fn, w.data)

    # the reference: a float64 copy (float32 products stall near 1e-7), Lanczos at tol 1e-8
    m64 = copy.deepcopy(w.model).double()
    x64 = w.inputs.double()
    C64 = cs.Curvature(m64, w.loss_fn, (x64, w.targets))
    ref = cs.eigenvalues(C64, k=5, tol=1e-8, max_matvecs=1000, max_basis=120)
    ref_min = cs.eigenvalues(C64, k=1, which="smallest", tol=1e-8, max_matvecs=1000, max_basis=120)
    top = ref.values.tolist()
    lmin = float(ref_min.values[0])
    rows = []

    def ours(label: str, k: int, which: str, truth: list[float]) -> None:
        r = cs.eigenvalues(C(), k=k, which=which)
        err = max(rel(float(v), t) for v, t in zip(r.values, truth, strict=True))
        rows.append(
            [
                label,
                str(r.matvecs),
                f"{r.seconds:.2f}",
                f"{err:.1e}" + ("" if r.all_converged else " (not converged)"),
            ]
        )

    ours("curvscope λ_max (defaults)", 1, "largest", top[:1])
    ours("curvscope top-5 (defaults)", 5, "largest", top)
    ours("curvscope λ_min (defaults)", 1, "smallest", [lmin])
    ours("curvscope λ_max and λ_min, one run", 1, "both", [top[0], lmin])
    if peers:
        try_peer(rows, "PyHessian λ_max (defaults)", lambda: pyhessian_eigs(w, 1), top)
        try_peer(rows, "PyHessian top-5 (defaults)", lambda: pyhessian_eigs(w, 5), top)
        try_peer(
            rows, "eigenthings λ_max, defaults (2 steps)", lambda: eigenthings_eigs(w, 1, None), top
        )
        try_peer(rows, "eigenthings λ_max, 20 steps", lambda: eigenthings_eigs(w, 1, 20), top)
        try_peer(rows, "eigenthings top-5, 50 steps", lambda: eigenthings_eigs(w, 5, 50), top)
        try_peer(
            rows, "eigenthings λ_min, 50 steps", lambda: eigenthings_eigs(w, 1, 50, "SA"), [lmin]
        )
        try_peer(
            rows, "curvlinops + eigsh λ_max, tol 1e-3", lambda: curvlinops_eigsh(w, 1, "LA"), top
        )
        try_peer(
            rows, "curvlinops + eigsh top-5, tol 1e-3", lambda: curvlinops_eigsh(w, 5, "LA"), top
        )
        try_peer(
            rows, "curvlinops + eigsh λ_min, tol 1e-3", lambda: curvlinops_eigsh(w, 1, "SA"), [lmin]
        )
    head = (
        f"### {w.name}: λ1 = {top[0]:.5g}, λ2 = {top[1]:.5g}, λ_min = {lmin:.5g} "
        f"(reference: {ref.matvecs + ref_min.matvecs} products)\n\n"
    )
    return head + markdown_table(["tool, setting", "products", "seconds", "rel. error (max)"], rows)


def density_table(w: Workload, peers: bool, steps: int = 100) -> str:
    rows = []
    d = cs.density(
        cs.Curvature(w.model, w.loss_fn, w.data), steps=steps, probes=1, progress_bar=False
    )
    rows.append(
        [
            f"curvscope density, {steps} Lanczos steps",
            str(d.matvecs),
            f"{d.seconds:.2f}",
            f"negative mass {d.negative_mass:.3f}",
        ]
    )
    if peers:
        try:
            mv, secs = eigenthings_density(w, steps)
            rows.append(
                [f"eigenthings spectral_density, {steps} steps", str(mv), f"{secs:.2f}", ""]
            )
        except ImportError as e:
            rows.append(["eigenthings", "", "", f"not installed ({e.name})"])
        try:
            ph = _pyhessian_module()
            start = time.perf_counter()
            ph.hessian(w.model, w.loss_fn, data=w.data, cuda=False).density(iter=steps, n_v=1)
            secs = time.perf_counter() - start
            rows.append([f"PyHessian density, {steps} steps", "", f"{secs:.2f}", ""])
        except Exception as e:
            rows.append(
                [
                    f"PyHessian density, {steps} steps",
                    str(steps),
                    "",
                    f"crashed: {type(e).__name__}: {str(e)[:50]}",
                ]
            )
    return f"### density, {w.name}\n\n" + markdown_table(
        ["tool, setting", "products", "seconds", "note"], rows
    )


def trained(w: Workload, steps: int = 300) -> Workload:
    """W1 after full-batch Adam: its curvature has the few dominant eigenvalues of a trained
    network, where Hutch++ is meant to shine."""
    model = copy.deepcopy(w.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        w.loss_fn(model(w.inputs), w.targets).backward()
        opt.step()
    return Workload(f"{w.name}, after {steps} Adam steps", model, w.loss_fn, w.inputs, w.targets)


def trace_table(w: Workload, peers: bool, budgets=(48, 198), seeds: int = 10) -> str:
    rows = []
    for kind in ("hessian", "ggn"):
        C = cs.Curvature(w.model, w.loss_fn, w.data, kind=kind)
        exact = cs.trace(C, method="exact").value
        for m in budgets:
            for method in ("hutchinson", "hutch++", "auto"):
                errs, chosen = [], set()
                for s in range(seeds):
                    r = cs.trace(C, m, method, seed=s)
                    errs.append(rel(r.value, exact))
                    chosen.add(r.method)
                rows.append(
                    [
                        kind,
                        str(m),
                        f"curvscope {method}"
                        + (f" (chose {', '.join(sorted(chosen))})" if method == "auto" else ""),
                        f"{statistics.mean(errs):.3f}",
                    ]
                )
        if peers and kind == "hessian":
            try:
                val, mv, _ = pyhessian_trace(w)
                rows.append(
                    [
                        kind,
                        str(mv),
                        "PyHessian trace (defaults, its own stopping)",
                        f"{rel(val, exact):.3f}",
                    ]
                )
            except ImportError:
                pass
    return f"### trace, {w.name} (mean relative error over {seeds} seeds)\n\n" + markdown_table(
        ["curvature", "products", "estimator", "mean rel. error"], rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batches, no peers")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    peers = not (args.quick or args.no_peers)
    big = [mlp_w2(128), cnn_w3(32)] if args.quick else [mlp_w2(), cnn_w3()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    for w in big:
        print(eigen_table(w, peers), end="\n\n", flush=True)
    print(density_table(big[0], peers), end="\n\n", flush=True)
    w1 = mlp_w1()
    for w in (w1, trained(w1, 50 if args.quick else 300)):
        print(trace_table(w, peers, seeds=3 if args.quick else 10), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
