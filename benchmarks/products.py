"""Cost of one curvature product relative to one gradient, for every kind and implementation,
with PyHessian's and curvlinops' products beside ours in the same run.

    python benchmarks/products.py [--repeats 7] [--quick]
    python benchmarks/products.py --small [--repeats 15]

Peers are optional (``pip install -e '.[bench]'``); a missing one is reported, not fatal.
Prints a markdown table per workload: median seconds and the ratio to one gradient
(forward + backward) measured in the same run.

``--small`` prices the fixed cost per product on small and recurrent models, where it is not
hidden by the arithmetic: for each workload one Hessian product from scratch (``cache=False``:
forward, gradient with its graph, backward), one from a new operator built for it (a new batch
each time, as the Monitor's batch sharpness and cheap tier do), and one through the kept gradient
graph, curvscope's beside the same product in plain torch (``torch.autograd.grad`` twice, on the
model itself: the floor of what a product can cost), each relative to one plain gradient; one
thread.
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    Workload,
    cnn_w3,
    interleaved_medians,
    markdown_table,
    mlp_w2,
    saved_tensor_mib,
    seeded,
)
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import curvscope as cs

BLOCK = 16
CHECK = "curvscope cache check: model unchanged since the graph was built (per product)"


def _gradient(w: Workload):
    params = list(w.model.parameters())

    def run():
        loss = w.loss_fn(w.model(w.inputs), w.targets)
        return torch.autograd.grad(loss, params)

    return run


def _torch_func_products(w: Workload):
    """Forward-over-reverse (jvp of grad) from scratch, single and vmapped: the alternative to
    double backward that curvscope measured and did not choose."""
    theta = {k: p.detach() for k, p in w.model.named_parameters()}

    def loss(t):
        return w.loss_fn(functional_call(w.model, t, (w.inputs,)), w.targets)

    def hvp(v):
        return jvp(grad(loss), (theta,), (v,))[1]

    v = {k: torch.randn_like(p) for k, p in theta.items()}
    vs = {k: torch.randn(BLOCK, *p.shape) for k, p in theta.items()}
    return (lambda: hvp(v)), (lambda: vmap(hvp)(vs))


def _peers(w: Workload, v: torch.Tensor) -> dict[str, object]:
    runs: dict[str, object] = {}
    try:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        comp = PyHessian(w.model, w.loss_fn, data=w.data, cuda=False)
        vs = list(torch.split(v, [p.numel() for p in comp.params]))
        vs = [t.reshape(p.shape) for t, p in zip(vs, comp.params, strict=True)]
        runs["PyHessian (gradient graph reused)"] = lambda: hessian_vector_product(
            comp.gradsH, comp.params, vs
        )
    except ImportError as e:
        runs["PyHessian"] = f"not installed ({e.name})"
    try:
        from curvlinops import HessianLinearOperator

        op = HessianLinearOperator(w.model, w.loss_fn, list(w.model.parameters()), [w.data])
        runs["curvlinops A @ v"] = lambda: op @ v
        V = torch.randn(v.numel(), BLOCK)
        runs[f"curvlinops A @ V, {BLOCK} vectors, per vector"] = (lambda: op @ V, BLOCK)
    except ImportError as e:
        runs["curvlinops"] = f"not installed ({e.name})"
    return runs


def _double_backward_from_scratch(w: Workload, v: torch.Tensor):
    """The textbook product in plain torch: forward, gradient with graph, backward of gᵀv."""
    params = list(w.model.parameters())
    vs = [
        t.reshape(p.shape)
        for t, p in zip(torch.split(v, [p.numel() for p in params]), params, strict=True)
    ]

    def run():
        loss = w.loss_fn(w.model(w.inputs), w.targets)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(g, params, vs)

    return run


def bench(w: Workload, repeats: int) -> str:
    torch.manual_seed(0)
    n = w.num_params
    v = torch.randn(n)
    V = torch.randn(n, BLOCK)
    fns: dict[str, object] = {"one gradient (forward + backward)": _gradient(w)}
    per: dict[str, int] = {}
    memory: dict[str, str] = {}
    chosen: dict[str, cs.Curvature] = {}  # row -> the operator whose "auto" choice labels it
    for kind in cs.KINDS:
        C = cs.Curvature(w.model, w.loss_fn, w.data, kind=kind)
        name = f"curvscope {kind}, cached graph"
        memory[name] = f"{saved_tensor_mib(lambda C=C: C @ v):.0f} MiB graph kept"
        fns[name] = lambda C=C: C @ v
        fns[f"{name}, {BLOCK} vectors, per vector"] = lambda C=C: C @ V
        per[f"{name}, {BLOCK} vectors, per vector"] = BLOCK
        chosen[f"{name}, {BLOCK} vectors, per vector"] = C
        fresh = cs.Curvature(w.model, w.loss_fn, w.data, kind=kind, cache=False)
        fns[f"curvscope {kind}, from scratch (data from a loader)"] = lambda C=fresh: C @ v
        fresh_block = cs.Curvature(w.model, w.loss_fn, w.data, kind=kind, cache=False)
        row = f"curvscope {kind}, from scratch, {BLOCK} vectors, per vector"
        fns[row] = lambda C=fresh_block: C @ V
        per[row] = BLOCK
        chosen[row] = fresh_block
        if kind == "hessian":  # what the cache pays per product to know the model is unchanged
            C @ v
            fns[CHECK] = C._unchanged
    fns["plain torch double backward, from scratch"] = _double_backward_from_scratch(w, v)
    single, block = _torch_func_products(w)
    fns["torch.func jvp(grad), from scratch"] = single
    fns[f"torch.func vmap(jvp(grad)), {BLOCK} vectors, per vector"] = block
    per[f"torch.func vmap(jvp(grad)), {BLOCK} vectors, per vector"] = BLOCK
    missing = []
    for name, run in _peers(w, v).items():
        if isinstance(run, str):
            missing.append([name, run, "", ""])
        elif isinstance(run, tuple):
            fns[name], per[name] = run
        else:
            fns[name] = run
    med = interleaved_medians(fns, repeats)
    base = med["one gradient (forward + backward)"]
    rows = []
    for name, t in med.items():
        t = t / per.get(name, 1)
        label = name
        if name in chosen and chosen[name].kind == "hessian":  # what backend="auto" kept
            op = chosen[name]
            label += f" [auto: {(op._block_backend or 'double_backward').replace('_', ' ')}]"
        rows.append([label, f"{t * 1e3:.1f}", f"{t / base:.2f}x", memory.get(name, "")])
    header = ["product", "ms", "relative to a gradient", "memory"]
    share = med[CHECK] / med["curvscope hessian, cached graph"]
    check = (
        f"\nThe cache's exact check that no parameter or buffer changed costs {share:.2%} of a "
        "cached Hessian product (target < 2%).\n"
    )
    table = markdown_table(header, rows + missing)
    return f"### {w.name} ({n:,} parameters, float32)\n\n" + table + check


# ----------------------------------------------------------------- small and recurrent models
class _LSTMHead(nn.Module):
    """An LSTM over a sequence and a linear head on its last state."""

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def small_workloads() -> list[Workload]:
    """The digits MLP of ``cs.problems`` (float64, as it ships), a few-thousand-parameter MLP, a
    tiny CNN and an LSTM with a linear head (float32)."""
    digits = cs.problems.get("digits-mlp")
    X, y = digits.data
    g = torch.Generator().manual_seed(0)
    mlp = seeded(
        0,
        lambda: nn.Sequential(
            nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
        ),
    )
    cnn = seeded(
        0,
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        ),
    )
    return [
        Workload(
            f"digits MLP 64-32-10 (cs.problems, float64), batch {len(X)}",
            digits.make_model(0),
            digits.loss_fn,
            X,
            y,
        ),
        Workload(
            "MLP 32-64-64-1, tanh, MSE, batch 256",
            mlp,
            nn.MSELoss(),
            torch.randn(256, 32, generator=g),
            torch.randn(256, 1, generator=g),
        ),
        Workload(
            "CNN 1x8x8, conv 8, conv 16, linear, batch 128",
            cnn,
            nn.CrossEntropyLoss(),
            torch.randn(128, 1, 8, 8, generator=g),
            torch.randint(0, 10, (128,), generator=g),
        ),
        Workload(
            "LSTM 16-64 + linear head, seq 32, batch 32",
            seeded(0, lambda: _LSTMHead(16, 64, 10)),
            nn.CrossEntropyLoss(),
            torch.randn(32, 32, 16, generator=g),
            torch.randint(0, 10, (32,), generator=g),
        ),
    ]


def _plain_cached(w: Workload, v: torch.Tensor):
    """The product through a gradient graph kept once, in plain torch (PyHessian's product)."""
    params = list(w.model.parameters())
    vs = [
        t.reshape(p.shape)
        for t, p in zip(torch.split(v, [p.numel() for p in params]), params, strict=True)
    ]
    loss = w.loss_fn(w.model(w.inputs), w.targets)
    g = torch.autograd.grad(loss, params, create_graph=True)
    return lambda: torch.autograd.grad(g, params, vs, retain_graph=True)


def bench_small(workloads: list[Workload], repeats: int) -> str:
    """One row per workload: the fixed cost per product, relative to one gradient."""
    rows = []
    for w in workloads:
        torch.manual_seed(0)
        v = torch.randn(w.num_params, dtype=next(w.model.parameters()).dtype)
        cached = cs.Curvature(w.model, w.loss_fn, w.data, cache=True)
        fresh = cs.Curvature(w.model, w.loss_fn, w.data, cache=False)
        fns = {
            "gradient": _gradient(w),
            "plain scratch": _double_backward_from_scratch(w, v),
            "scratch": lambda C=fresh, v=v: C @ v,
            "plain cached": _plain_cached(w, v),
            "cached": lambda C=cached, v=v: C @ v,
            "new operator": lambda w=w, v=v: cs.Curvature(w.model, w.loss_fn, w.data) @ v,
        }
        med = interleaved_medians(fns, repeats)
        base = med["gradient"]
        rows.append(
            [w.name, f"{w.num_params:,}", f"{base * 1e3:.2f}"]
            + [
                f"{med[k] / base:.2f}x"
                for k in ("scratch", "new operator", "plain scratch", "cached", "plain cached")
            ]
        )
    header = [
        "workload",
        "parameters",
        "gradient ms",
        "curvscope from scratch",
        "curvscope, a new operator per product",
        "plain torch from scratch",
        "curvscope cached",
        "plain torch cached",
    ]
    return markdown_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small batches, 3 repeats")
    ap.add_argument(
        "--small", action="store_true", help="the fixed cost per product on small models"
    )
    args = ap.parse_args()
    if args.small:
        torch.set_num_threads(1)
        print(f"torch {torch.__version__}, 1 thread, median of {args.repeats} rounds\n")
        print(bench_small(small_workloads(), args.repeats))
        return
    torch.set_num_threads(torch.get_num_threads())
    workloads = [mlp_w2(128), cnn_w3(32)] if args.quick else [mlp_w2(), cnn_w3()]
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats}\n")
    for w in workloads:
        print(bench(w, repeats), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
