"""At scale: torch's own causal transformer at 0.2M to 8M parameters and a ResNet-style CNN with
BatchNorm (train mode; ``cnn-eval``: in eval mode, the matrix PyHessian computes, which
switches every model to eval mode), against PyHessian and hessian-eigenthings in the same
process.

    python benchmarks/scale.py [--sizes 0.2M,0.5M,2M,8M,cnn,cnn-eval] [--quick] [--threads N] [--fd]
                               [--device cuda]

Per model: one gradient (forward + backward, the default attention kernel); one Hessian
product relative to it, curvscope's (``C @ v``, the cached gradient graph) and PyHessian's
(``hessian_vector_product`` on the gradient graph it keeps), timed round-robin; λ_max by
curvscope's defaults (products, seconds, relative error) and by hessian-eigenthings' Lanczos
with 20 steps (seconds, error), against a reference of curvscope Lanczos at tol 1e-6 with a
large basis; and the peak memory of curvscope's λ_max run: the growth of the process's
maximum resident set size (``getrusage``'s ``ru_maxrss``) over the peak of one plain gradient,
measured first in a fresh process per model (torch's CPU allocator keeps no statistics, and
tracemalloc does not see its allocations). With ``--device cuda`` everything (the peers too)
runs on the GPU, every timing waits for the device (``torch.cuda.synchronize``) before it reads
the clock, and the memory column is the growth of ``torch.cuda.max_memory_allocated`` instead.

Transformer: token embedding and learned positions, ``nn.TransformerEncoder`` layers
(pre-norm, ReLU, dropout 0 so that every tool sees one fixed matrix) under a
causal mask, a linear head over a vocabulary of 512; cross-entropy next-token loss on seeded
random tokens, batch 8 x 64, CPU float32. Both peers fail on it unless attention runs on its
math kernel (the fused kernels have no double backward), so they run under
``sdpa_kernel(SDPBackend.MATH)``; curvscope selects that kernel itself. The gradient is timed
with torch's default kernel, the user's own training step.

``--fd`` adds a second table: the finite-difference backend (``backend="finite_difference"``,
the path for a model only its engine can differentiate) on the same float32 model — one
product's cost in gradients, λ_max by its defaults with its error against the reference, the
largest error its products estimated for themselves, and whether it says it converged.

Each model runs in its own subprocess; the script prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import torch
from _common import interleaved_medians, markdown_table
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvscope as cs

VOCAB, BATCH, T = 512, 8, 64
#: name -> (d_model, layers, feed-forward width, heads)
TRANSFORMERS = {
    "0.2M": (64, 2, 256, 4),
    "0.5M": (128, 2, 512, 4),
    "2M": (192, 4, 768, 6),
    "8M": (384, 4, 1792, 6),
}
SIZES = [*TRANSFORMERS, "cnn", "cnn-eval"]
QUICK = ["0.2M", "0.5M"]


class CausalLM(nn.Module):
    def __init__(self, d: int, layers: int, ff: int, heads: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.02 * torch.randn(T, d))
        layer = nn.TransformerEncoderLayer(
            d, heads, ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(self.enc(h, mask=self.mask, is_causal=True))


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))


class Block(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.skip = (
            nn.Sequential()
            if stride == 1 and c_in == c
            else nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


def resnet() -> nn.Module:
    """A small ResNet (three stages of one basic block, 16/32/64 channels) for 3x32x32."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 16, 1),
        Block(16, 32, 2),
        Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def workload(name: str, device: str = "cpu"):
    """(model, loss_fn, (inputs, targets), description), seeded (drawn on the CPU, then moved
    to ``device``: the same numbers on every device)."""
    model, loss_fn, (x, y), desc = _workload(name)
    return model.to(device), loss_fn, (x.to(device), y.to(device)), desc


def _workload(name: str):
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name.startswith("cnn"):
            model = resnet().train(name == "cnn")
            x = torch.randn(64, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (64,), generator=gen)
            mode = "train" if model.training else "eval, as PyHessian runs it"
            return model, nn.CrossEntropyLoss(), (x, y), f"ResNet (BatchNorm, {mode}), batch 64"
        model = CausalLM(*TRANSFORMERS[name]).train()
    tokens = torch.randint(0, VOCAB, (BATCH, T + 1), generator=gen)
    d, layers, ff, heads = TRANSFORMERS[name]
    desc = f"transformer d={d}, {layers} layers, {heads} heads, ff {ff}"
    return model, lm_loss, (tokens[:, :-1], tokens[:, 1:]), desc


def peak_mib(device: torch.device) -> float:
    """The process's peak memory so far: the device allocator's on CUDA, the maximum resident
    set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synced(fn, device: torch.device):
    """``fn`` followed by a wait for the device, so that a timing covers the work it queued."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def rel(x: float, ref: float) -> float:
    return abs(x - ref) / abs(ref)


def pyhessian_product(model: nn.Module, loss_fn, data, v: torch.Tensor):
    """PyHessian's product on the gradient graph it builds once (on a copy: PyHessian switches
    the model to eval mode for good)."""
    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product

    with sdpa_kernel(SDPBackend.MATH):
        cuda = next(model.parameters()).is_cuda
        comp = PyHessian(copy.deepcopy(model), loss_fn, data=data, cuda=cuda)
    sizes = [p.numel() for p in comp.params]
    vs = [t.reshape(p.shape) for t, p in zip(torch.split(v, sizes), comp.params, strict=True)]
    return lambda: hessian_vector_product(comp.gradsH, comp.params, vs)


def eigenthings_top(model: nn.Module, loss_fn, data, steps: int = 20) -> tuple[float, float]:
    import hessian_eigenthings as he

    start = time.perf_counter()
    with sdpa_kernel(SDPBackend.MATH):
        op = he.HessianOperator(model, [data], lambda m, b: loss_fn(m(b[0]), b[1]))
        r = he.lanczos(op, k=1, max_iter=steps, which="LA", seed=0)
    return float(max(r.eigenvalues)), time.perf_counter() - start


def one(name: str, threads: int, rounds: int, fd: bool = False, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    model, loss_fn, data, desc = workload(name, device)
    params = [p for p in model.parameters()]
    out: dict = {"name": name, "desc": desc, "params": sum(p.numel() for p in params)}
    # a warm-up gradient (kernels loaded, as for the peers that run later), then curvscope's
    # λ_max first in this fresh process: the memory growth over a gradient's peak is its own
    torch.autograd.grad(loss_fn(model(data[0]), data[1]), params)
    base = peak_mib(dev)
    r = cs.eigenvalues(cs.Curvature(model, loss_fn, data))
    out["cs_mem_mib"] = peak_mib(dev) - base
    out["cs_products"], out["cs_seconds"] = r.matvecs, r.seconds
    lam = float(r.values[0])
    ref = cs.eigenvalues(
        cs.Curvature(model, loss_fn, data), tol=1e-6, max_matvecs=400, max_basis=100
    )
    out["ref"], out["ref_products"], out["ref_converged"] = (
        float(ref.values[0]),
        ref.matvecs,
        ref.all_converged,
    )
    out["cs_err"] = rel(lam, out["ref"])
    try:
        top, secs = eigenthings_top(copy.deepcopy(model), loss_fn, data)
        out["et_seconds"], out["et_err"] = secs, rel(top, out["ref"])
        out["et_mem_mib"] = peak_mib(dev) - base
    except ImportError as e:
        out["et_error"] = f"not installed ({e.name})"
    # products, round-robin in the same process
    C = cs.Curvature(model, loss_fn, data)
    v = torch.randn(C.num_params, generator=torch.Generator().manual_seed(1)).to(dev)
    C @ v  # builds and keeps the gradient graph

    def gradient():
        return torch.autograd.grad(loss_fn(model(data[0]), data[1]), params)

    fns = {"gradient": gradient, "curvscope": lambda: C @ v}
    try:
        fns["pyhessian"] = pyhessian_product(model, loss_fn, data, v)
    except ImportError as e:
        out["ph_error"] = f"not installed ({e.name})"
    fns = {k: synced(fn, dev) for k, fn in fns.items()}
    gradient = fns["gradient"]
    med = interleaved_medians(fns, rounds=rounds, inner=2)
    out["grad_ms"] = 1e3 * med["gradient"]
    out["cs_ratio"] = med["curvscope"] / med["gradient"]
    if "pyhessian" in med:
        out["ph_ratio"] = med["pyhessian"] / med["gradient"]
    if fd:
        out.update(finite_differences(model, loss_fn, data, out["ref"], gradient, v))
    return out


def finite_differences(model, loss_fn, data, ref: float, gradient, v) -> dict:
    """The finite-difference backend (the path for models only their engine differentiates)
    on the same model in float32: λ_max by its defaults — products, seconds, error against the
    exact reference, the largest estimated product error, whether it says it converged — and
    one product's cost in gradients (its passes vary with the step it settles on)."""
    F = cs.Curvature(model, loss_fn, data, backend="finite_difference")
    r = cs.eigenvalues(F)
    out = {
        "fd_products": r.matvecs,
        "fd_seconds": r.seconds,
        "fd_err": rel(float(r.values[0]), ref),
        "fd_estimate": max(F.product_errors),
        "fd_converged": r.all_converged,
    }
    fd_product = synced(lambda: F @ v, v.device)
    med = interleaved_medians({"gradient": gradient, "fd": fd_product}, rounds=3, inner=2)
    out["fd_ratio"] = med["fd"] / med["gradient"]
    return out


def fd_row(o: dict) -> list[str]:
    return [
        f"{o['name']}: {o['desc']} ({o['params'] / 1e6:.2f}M)",
        f"{o['fd_ratio']:.1f}x",
        f"{o['fd_products']}, {o['fd_seconds']:.1f} s",
        f"{o['fd_err']:.1e}",
        f"{o['fd_estimate']:.1e}",
        "yes" if o["fd_converged"] else "no (says so)",
    ]


FD_HEADER = [
    "model",
    "finite-difference product / gradient",
    "λ_max: products, time",
    "rel. error",
    "largest estimated product error (of ‖H‖)",
    "converged",
]


def row(o: dict) -> list[str]:
    ph = f"{o['ph_ratio']:.2f}x" if "ph_ratio" in o else o.get("ph_error", "")
    vs = f"{o['cs_ratio'] / o['ph_ratio']:.2f}" if "ph_ratio" in o else ""
    et = (
        f"{o['et_seconds']:.2f} s, {o['et_err']:.1e}"
        if "et_seconds" in o
        else o.get("et_error", "")
    )
    t_vs = f"{o['cs_seconds'] / o['et_seconds']:.2f}" if "et_seconds" in o else ""
    ref = f"{o['ref']:.5g}" + ("" if o["ref_converged"] else " (not converged)")
    return [
        f"{o['name']}: {o['desc']} ({o['params'] / 1e6:.2f}M)",
        f"{o['grad_ms']:.1f}",
        f"{o['cs_ratio']:.2f}x",
        ph,
        vs,
        ref,
        f"{o['cs_products']}, {o['cs_seconds']:.2f} s, {o['cs_err']:.1e}",
        et,
        t_vs,
        f"{o['cs_mem_mib']:.0f}",
    ]


HEADER = [
    "model",
    "gradient ms",
    "product / gradient: curvscope",
    "PyHessian",
    "curvscope / PyHessian",
    "λ_max (reference)",
    "curvscope λ_max: products, time, rel. error",
    "eigenthings 20-step Lanczos: time, rel. error",
    "time: curvscope / eigenthings",
    "curvscope λ_max peak memory growth, MiB",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {SIZES}")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}, 3 rounds")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--fd", action="store_true", help="also the finite-difference backend (a second table)"
    )
    ap.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda: where the models and peers run"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = "unknown"
    if kind not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: choose cpu or cuda (cuda:N for another GPU)")
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.one:
        result = one(args.one, args.threads, args.rounds, args.fd, args.device)
        print("RESULT " + json.dumps(result), flush=True)
        return
    sizes = QUICK if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown sizes {unknown}; choose from {SIZES}")
    rounds = 3 if args.quick else args.rounds
    where = (
        f"{torch.cuda.get_device_name(torch.device(args.device))}"
        if args.device != "cpu"
        else f"CPU, {args.threads} threads"
    )
    print(f"torch {torch.__version__}, {where}, medians of {rounds} rounds\n")
    rows, fd_rows = [], []
    for s in sizes:
        cmd = [sys.executable, __file__, "--one", s, "--threads", str(args.threads)]
        cmd += ["--rounds", str(rounds), "--device", args.device, *(["--fd"] if args.fd else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{s}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        rows.append(row(result))
        if args.fd:
            fd_rows.append(fd_row(result))
        print(markdown_table(HEADER, rows[-1:]), flush=True)  # progress, one model at a time
    print("\n" + markdown_table(HEADER, rows))
    if fd_rows:
        print("\nfinite differences (float32):\n\n" + markdown_table(FD_HEADER, fd_rows))


if __name__ == "__main__":
    main()
