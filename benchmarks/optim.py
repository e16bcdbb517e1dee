"""Our Newton-type optimizers against scipy.optimize and torch's LBFGS on classic problems, and
AdaHessian/Sophia against Adam on the digits MLP.

    python benchmarks/optim.py [--repeats 3] [--skip-mlp]

Every method sees the same torch function (float64): f, its gradient and Hessian-vector
products by autograd (scipy gets them through numpy views). Success is judged here, not by the
method: at the end ‖g‖ ≤ 1e-5·max(1, |f|), no negative curvature (cs.optim.stationary_point),
and f within 1e-6 of the known minimum where one is known. Wall time is the median of the
repeats; iteration, gradient and product counts are deterministic.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.optimize as so
import torch
from _common import markdown_table

import curvscope as cs

GTOL = 1e-6
MAXITER = 1000
#: The dense methods (our Newton, scipy's BFGS) are skipped above this many parameters.
DENSE_MAX = 100
DT = torch.float64


def logistic(x0_seed: int = 0) -> tuple[Callable, torch.Tensor, float | None]:
    X, y = cs.problems.load_breast_cancer()
    y = y[:, 0]

    def f(w: torch.Tensor) -> torch.Tensor:
        z = X @ w[:-1] + w[-1]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 1e-3 * (w @ w) / 2

    return f, torch.zeros(31, dtype=DT), None


def problems() -> list[tuple[str, Callable, torch.Tensor, float | None]]:
    out = []
    for name in (
        "freudenstein-roth",
        "brown-badly-scaled",
        "helical-valley",
        "powell-singular",
        "wood",
        "beale",
    ):
        p = cs.problems.get(name)
        out.append((name, p.f, p.x0, p.f_min))
    for n in (2, 100, 1000):
        p = cs.problems.get("extended-rosenbrock", n=n)
        out.append((f"extended rosenbrock n={n}", p.f, p.x0, 0.0))
    p = cs.problems.get("rosenbrock", n=100)
    out.append(("chained rosenbrock n=100", p.f, p.x0, 0.0))
    q = cs.problems.get("quadratic", n=100, condition=1e4)
    out.append(("quadratic n=100 κ=1e4", q.f, q.x0, 0.0))
    f, x0, fmin = logistic()
    out.append(("logreg breast-cancer (+1e-3 L2)", f, x0, fmin))
    return out


class Counted:
    """f, ∇f and Hv of a torch function, counted, for scipy (numpy in and out). Each Hv is
    computed from scratch (scipy's hessp interface gives no way to keep the gradient graph);
    ours reuse one graph per step: that difference is part of what is measured."""

    def __init__(self, f: Callable) -> None:
        self.f, self.nf, self.ng, self.nh = f, 0, 0, 0

    def fun(self, x: np.ndarray) -> float:
        self.nf += 1
        with torch.no_grad():
            return float(self.f(torch.from_numpy(x)))

    def jac(self, x: np.ndarray) -> np.ndarray:
        self.ng += 1
        return cs.grad(self.f, torch.from_numpy(x)).numpy()

    def hessp(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        self.nh += 1
        return cs.hvp(self.f, torch.from_numpy(x), torch.from_numpy(v)).numpy()


def run_scipy(method: str, f: Callable, x0: torch.Tensor) -> dict:
    if method == "BFGS" and x0.numel() > DENSE_MAX:
        return {}  # a dense n×n inverse-Hessian update per iteration: minutes at n = 1000
    c = Counted(f)
    kw: dict = {"jac": c.jac}
    if method in ("trust-ncg", "trust-krylov", "Newton-CG"):
        kw["hessp"] = c.hessp
    opts: dict = {"maxiter": MAXITER}
    if method == "L-BFGS-B":
        opts["ftol"] = 1e-15  # its default stops on a small relative decrease before ‖g‖ is small
    opts["gtol" if method != "Newton-CG" else "xtol"] = GTOL if method != "Newton-CG" else 1e-12
    t = time.perf_counter()
    r = so.minimize(c.fun, x0.numpy().copy(), method=method, options=opts, **kw)
    return {
        "x": torch.from_numpy(r.x),
        "iterations": r.nit,
        "gradients": c.ng,
        "products": c.nh,
        "evaluations": c.nf,
        "seconds": time.perf_counter() - t,
        "claims": bool(r.success),
    }


def run_torch_lbfgs(f: Callable, x0: torch.Tensor) -> dict:
    x = x0.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [x],
        line_search_fn="strong_wolfe",
        max_iter=MAXITER,
        tolerance_grad=GTOL,
        tolerance_change=0.0,
        history_size=10,
    )
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        calls[0] += 1
        return loss

    t = time.perf_counter()
    opt.step(closure)
    n_iter = opt.state[opt._params[0]]["n_iter"]
    return {
        "x": x.detach(),
        "iterations": n_iter,
        "gradients": calls[0],
        "products": 0,
        "evaluations": calls[0],
        "seconds": time.perf_counter() - t,
        "claims": True,
    }


def run_ours(name: str, f: Callable, x0: torch.Tensor) -> dict:
    x = x0.clone().requires_grad_()
    if name == "newton" and x.numel() > DENSE_MAX:
        return {}  # n products per step for the dense Hessian
    opt = cs.optim.build(name, [x], tolerance_grad=GTOL)
    t = time.perf_counter()
    k = 0
    for k in range(MAXITER + 1):  # noqa: B007
        opt.step(lambda: f(x))
        if opt.info.grad_norm <= GTOL:  # converged where this step started: it did no work
            break
    secs = time.perf_counter() - t
    c = opt.counts
    return {
        "x": x.detach(),
        "iterations": k,
        "gradients": c.gradients,
        "products": c.products,
        "evaluations": c.closure_calls,
        "seconds": secs,
        "claims": True,
    }


def judge(f: Callable, x: torch.Tensor, f_min: float | None) -> tuple[bool, float, str]:
    xl = x.clone().requires_grad_()
    point = cs.optim.stationary_point(lambda: f(xl), [xl], grad_tol=1e-5)
    ok = point.kind in ("minimum", "degenerate")
    if f_min is not None and math.isfinite(f_min):
        ok = ok and point.loss <= f_min + 1e-6 * (1 + abs(f_min))
    return ok, point.loss, point.kind


METHODS: dict[str, Callable] = {
    "ours newton-cg": lambda f, x0: run_ours("newton-cg", f, x0),
    "ours cubic-newton": lambda f, x0: run_ours("cubic-newton", f, x0),
    "ours newton": lambda f, x0: run_ours("newton", f, x0),
    "scipy trust-ncg": lambda f, x0: run_scipy("trust-ncg", f, x0),
    "scipy trust-krylov": lambda f, x0: run_scipy("trust-krylov", f, x0),
    "scipy Newton-CG": lambda f, x0: run_scipy("Newton-CG", f, x0),
    "scipy BFGS": lambda f, x0: run_scipy("BFGS", f, x0),
    "scipy L-BFGS-B": lambda f, x0: run_scipy("L-BFGS-B", f, x0),
    "torch LBFGS": run_torch_lbfgs,
}


def classic(repeats: int) -> str:
    rows, solved = [], {m: 0 for m in METHODS}
    for pname, f, x0, fmin in problems():
        for mname, run in METHODS.items():
            results = [run(f, x0) for _ in range(repeats)]
            if not results[0]:
                continue
            r = results[0]
            ok, fx, kind = judge(f, r["x"], fmin)
            solved[mname] += ok
            secs = statistics.median(x["seconds"] for x in results)
            rows.append(
                [
                    pname,
                    mname,
                    "yes" if ok else f"**no** ({kind})",
                    f"{fx:.3g}",
                    str(r["iterations"]),
                    str(r["gradients"]),
                    str(r["products"]),
                    f"{secs * 1e3:.0f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(
        ["problem", "method", "success", "f", "iterations", "gradients", "Hv products", "ms"], rows
    )
    summary = markdown_table(
        ["method", "solved"], [[m, f"{s}/{len(problems())}"] for m, s in solved.items()]
    )
    return table + "\n\n" + summary


def mlp(repeats: int) -> str:
    X, y = cs.problems.load_digits(None, DT)
    (Xtr, ytr), (Xte, yte) = (X[:1000], y[:1000]), (X[1000:], y[1000:])
    p = cs.problems.get("digits-mlp")
    rows = []
    for name, kw in [
        ("adam", {"lr": 0.01}),
        ("adahessian", {"lr": 0.1}),
        ("sophia", {"lr": 0.01, "update_every": 5}),
    ]:
        times, accs, first = [], [], []
        for _ in range(repeats):
            model = p.make_model(0)
            opt = cs.optim.build(name, model.parameters(), **kw)
            t, hit = time.perf_counter(), math.nan
            for step in range(1, 201):
                if cs.optim.get(name).source == "torch":
                    opt.zero_grad()
                    p.loss_fn(model(Xtr), ytr).backward()
                    opt.step()
                else:
                    opt.step(lambda model=model: p.loss_fn(model(Xtr), ytr))
                if math.isnan(hit) and step % 5 == 0:
                    with torch.no_grad():
                        if (model(Xte).argmax(1) == yte).double().mean() >= 0.9:
                            hit = time.perf_counter() - t
            times.append(time.perf_counter() - t)
            with torch.no_grad():
                accs.append(float((model(Xte).argmax(1) == yte).double().mean()))
            first.append(hit)
        rows.append(
            [
                name,
                f"{statistics.median(accs):.3f}",
                f"{statistics.median(first):.2f}",
                f"{statistics.median(times):.2f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return markdown_table(
        ["optimizer", "held-out accuracy after 200 steps", "s to 90% held-out", "s for 200 steps"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-mlp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(classic(args.repeats))
    if not args.skip_mlp:
        print()
        print(mlp(args.repeats))


if __name__ == "__main__":
    main()
