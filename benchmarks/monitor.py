"""The Monitor in real training loops: what a probe costs, and its overhead.

    python benchmarks/monitor.py [--steps 2000] [--repeats 3] [--probe-cost-only]

1. Probe cost (issue 16.2: a probe at <= 40% of a cold diagnosis's products). On a digits MLP
   (SGD, momentum 0.9) and a tiny causal transformer (AdamW), a Monitor probes every few dozen
   steps; at each probe a cold diagnosis (no warm start, everything measured) runs at the same
   point. Reported: the products of each (medians), their ratio, whether the verdicts agree,
   and how far the probe's sharpness is from the cold one's.
2. Overhead: trains the digits MLP with plain SGD three ways — no Monitor, the default Monitor
   (adaptive cadence, 5% overhead budget), and a fixed cadence of every 50 steps — interleaved,
   and reports the median wall time and the overhead relative to no Monitor, with the number of
   probes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import markdown_table

import curvscope as cs


def train(steps: int, batch: int, monitor: str) -> tuple[float, str, float, float]:
    """Seconds, "probes + checks", the probes' and checks' share of the loop (the Monitor's own
    accounting), and the median seconds of a ``mon.step(loss)`` call that neither probed nor
    checked — timed inside the loop, where it costs more than called alone in a tight loop
    (4.3 µs there; an outside review measured 19–36 µs in a loop, which that figure hid)."""
    p = cs.problems.get("digits-mlp", hidden=32, n=None)
    X, Y = p.data
    model = p.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = (X[:512], Y[:512])
    mon = None
    if monitor == "default":
        mon = cs.Monitor(model, p.loss_fn, probe, optimizer=opt)
    elif monitor == "default, no cheap tier":
        mon = cs.Monitor(model, p.loss_fn, probe, optimizer=opt, update_every=0)
    elif monitor == "every 50":
        mon = cs.Monitor(model, p.loss_fn, probe, optimizer=opt, every=50)
    gen = torch.Generator().manual_seed(0)
    quiet: list[float] = []  # mon.step's seconds on steps without a probe or a check
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(X), (batch,), generator=gen)
        opt.zero_grad()
        loss = p.loss_fn(model(X[idx]), Y[idx])
        loss.backward()
        opt.step()
        if mon is not None:
            seen = len(mon.history) + len(mon.updates)
            called = time.perf_counter()
            mon.step(loss)
            if len(mon.history) + len(mon.updates) == seen:
                quiet.append(time.perf_counter() - called)
    share = 0.0 if mon is None else (mon.probe_seconds + mon.update_seconds) / mon.train_seconds
    seconds = time.perf_counter() - start
    n = "0" if mon is None else f"{len(mon.history)} + {len(mon.updates)}"
    return seconds, n, share, statistics.median(quiet) if quiet else 0.0


class TinyCausalLM(torch.nn.Module):
    """Embedding, two pre-norm causal encoder layers (d 32, 2 heads), a linear head."""

    def __init__(self, vocab: int = 64, d: int = 32, seq: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(seq, d))
        layer = torch.nn.TransformerEncoderLayer(
            d, 2, 64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.encoder(h, mask=self.mask, is_causal=True))


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )


def _sequences(n: int, seq: int = 16, vocab: int = 64) -> torch.Tensor:
    """A learnable task: each sequence counts up from a random start, modulo the vocabulary,
    by a stride of 1, 2 or 3."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(seq)) % vocab


def _probe_cost_runs() -> list[dict]:
    """(name, model, loss_fn, probe data, optimizer, batches, every) of the probe-cost runs."""
    torch.manual_seed(0)
    p = cs.problems.get("digits-mlp", hidden=32, n=None, dtype=torch.float32)
    X, Y = p.data
    mlp = p.make_model(0)
    g = torch.Generator().manual_seed(0)
    mlp_batches = [torch.randint(0, len(X), (128,), generator=g) for _ in range(1000)]
    tokens = _sequences(2048)
    torch.manual_seed(0)
    lm = TinyCausalLM()
    lm_batches = [torch.randint(0, len(tokens), (32,), generator=g) for _ in range(400)]
    return [
        {
            "name": "digits MLP 64-32-10, SGD momentum 0.9, lr 0.1, probe batch 512",
            "model": mlp,
            "loss_fn": p.loss_fn,
            "probe": (X[:512], Y[:512]),
            "opt": torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9),
            "step": lambda idx: (X[idx], Y[idx]),
            "batches": mlp_batches,
            "every": 50,
        },
        {
            "name": f"tiny causal transformer ({sum(q.numel() for q in lm.parameters()):,} "
            "parameters), AdamW lr 3e-3, probe batch 64 sequences",
            "model": lm,
            "loss_fn": _next_token_loss,
            "probe": (tokens[:64], tokens[:64]),
            "opt": torch.optim.AdamW(lm.parameters(), lr=3e-3),
            "step": lambda idx: (tokens[idx], tokens[idx]),
            "batches": lm_batches,
            "every": 25,
        },
    ]


def probe_cost() -> list[list[str]]:
    rows = []
    for run in _probe_cost_runs():
        model, loss_fn, opt = run["model"], run["loss_fn"], run["opt"]
        mon = cs.Monitor(model, loss_fn, run["probe"], optimizer=opt, every=run["every"])
        probe, cold, agree, err = [], [], 0, []
        for idx in run["batches"]:
            x, y = run["step"](idx)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            d = mon.step(loss)
            if d is None or len(mon.history) == 1:  # the first probe has no warm start
                continue
            c = cs.diagnose(model, loss_fn, run["probe"], opt)
            probe.append(d.evidence["matvecs"])
            cold.append(c.evidence["matvecs"])
            agree += classify_once(d) == c.state
            s, s0 = d.evidence["sharpness"], c.evidence["sharpness"]
            err.append(abs(s - s0) / abs(s0))
        mp, mc = statistics.median(probe), statistics.median(cold)
        rows.append(
            [
                run["name"],
                str(len(probe)),
                f"{mp:g} (mean {statistics.mean(probe):.1f})",
                f"{mc:g}",
                f"{100 * mp / mc:.0f}%",
                f"{agree}/{len(probe)}",
                f"{100 * max(err):.1f}%",
            ]
        )
    return rows


def classify_once(d: cs.Diagnosis) -> str:
    """The probe's own verdict, before history (a cold diagnosis has none)."""
    return str(cs.diagnosis.classify(d.evidence)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--probe-cost-only", action="store_true")
    ap.add_argument("--overhead-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.overhead_only:
        print_probe_cost()
    if args.probe_cost_only:
        return
    print_overhead(args.steps, args.batch, args.repeats)


def print_probe_cost() -> None:
    print("### Probe cost: a Monitor probe against a cold diagnosis at the same point\n")
    print(
        markdown_table(
            [
                "run",
                "probes",
                "products / probe: median (mean)",
                "products / cold diagnosis",
                "ratio",
                "same verdict",
                "max sharpness difference",
            ],
            probe_cost(),
        )
    )
    print()


def print_overhead(steps: int, batch: int, repeats: int) -> None:
    modes = ["none", "default", "default, no cheap tier", "every 50"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    probes: dict[str, str] = {}
    shares: dict[str, list[float]] = {m: [] for m in modes}
    calls: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            t, n, share, call = train(steps, batch, m)
            times[m].append(t)
            probes[m] = n
            shares[m].append(share)
            calls[m].append(call)
    base = statistics.median(times["none"])
    rows = []
    for m in modes:
        t = statistics.median(times[m])
        rows.append(
            [
                f"Monitor: {m}",
                probes[m],
                f"{t:.2f}",
                f"{100 * (t / base - 1):+.1f}%",
                f"{100 * statistics.median(shares[m]):.1f}%",
                "—" if m == "none" else f"{1e6 * statistics.median(calls[m]):.1f}",
            ]
        )
    print(
        f"### Monitor overhead: digits MLP 64-32-10, SGD momentum 0.9, batch {batch}, "
        f"{steps} steps, probe batch 512 (median of {repeats})\n"
    )
    print(
        markdown_table(
            [
                "run",
                "probes + checks",
                "seconds",
                "wall-time overhead vs none",
                "probe and check time / loop time",
                "µs per mon.step without a probe or check (median)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
