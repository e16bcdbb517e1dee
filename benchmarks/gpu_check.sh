#!/usr/bin/env bash
# The GPU check: everything curvscope promises on CUDA, in one run of under 8 minutes.
#
#     bash benchmarks/gpu_check.sh            # on a machine with a CUDA device
#
# Run from anywhere, with the project's virtual environment already built (.venv; or set
# PYTHON=/path/to/python): nothing is installed. Each part runs under its own timeout (the
# caps add up to 480 s), writes its full output to $GPU_CHECK_LOGS (default: a fresh temporary
# directory) and one line to the summary printed at the end; the exit status is 0 only when
# every part passed.
#
#   env        torch, CUDA and the device, and that CUDA works at all             30 s
#   devices    tests/test_devices.py: every estimator, diagnose, the Monitor and
#              bfloat16 products on cuda against the float64 CPU reference       150 s
#   fd         finite-difference products, FSDP2 on two CPU (gloo) processes      90 s
#   fsdp-cuda  FSDP2 (fully_shard, NCCL, one rank) on the GPU: the sharded
#              model's finite-difference products against the exact product       60 s
#   bench      a quick product benchmark on the GPU (benchmarks/scale.py --quick
#              --device cuda instead, once scale.py takes --device)              150 s
#
# GPU_CHECK_ALLOW_CPU=1 runs the same parts without a GPU (cpu in place of cuda): a dry run
# of this script's own logic, not a check of anything CUDA.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t curvscope-gpu-check.XXXXXX)}
mkdir -p "$LOGS"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=()
FAILED=0

# run_part NAME SECONDS COMMAND...: run under a timeout, log, and record one summary line
run_part() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc
    echo "== $name (at most ${limit}s; log: $LOGS/$name.log)"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - start)) last
    last=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-150)
    if [ $rc -eq 0 ]; then
        SUMMARY+=("PASS    $name (${took}s): $last")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        SUMMARY+=("TIMEOUT $name (${took}s, cap ${limit}s): $last")
        FAILED=1
    else
        SUMMARY+=("FAIL    $name (${took}s, exit $rc): $last")
        FAILED=1
    fi
    tail -n 25 "$LOGS/$name.log"
}

# ------------------------------------------------------------------------------ env
run_part env 30 "$PY" - <<'EOF'
import os, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
if not torch.cuda.is_available():
    if os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
        print("no CUDA device: dry run on the CPU (GPU_CHECK_ALLOW_CPU=1)")
        sys.exit(0)
    sys.exit("no CUDA device: this check needs one (GPU_CHECK_ALLOW_CPU=1 for a dry run)")
x = torch.randn(256, 256, device="cuda", dtype=torch.float64)
torch.cuda.synchronize()
print(torch.cuda.get_device_name(0), "| float64 matmul ok:", bool(torch.isfinite(x @ x).all()))
EOF
if [ $FAILED -ne 0 ]; then
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
fi

# -------------------------------------------------------------------------- devices
# -rs lists the skipped ones: on a GPU machine no cuda instance may be skipped
run_part devices 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_devices.py
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    && grep -q "SKIPPED" "$LOGS/devices.log"; then
    SUMMARY+=("FAIL    devices: cuda instances were skipped on a machine with CUDA")
    FAILED=1
fi

# ------------------------------------------------------------------- finite differences
run_part fd 90 "$PY" -m pytest -q -p no:cacheprovider \
    tests/derivatives/test_finite_difference.py tests/derivatives/test_fd_transformers.py \
    tests/distributed/test_fsdp.py tests/distributed/test_sharded.py

# --------------------------------------------------------------------- FSDP2 on CUDA
run_part fsdp-cuda 60 "$PY" - <<'EOF'
"""FSDP2 on the GPU (one rank: NCCL; the two-rank run is the gloo test above): the sharded
model's finite-difference Hessian products against the exact product of an unsharded copy."""
import copy, os, socket
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from tests.derivatives.test_finite_difference import smooth

cuda = torch.cuda.is_available()
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
try:
    for dtype in (torch.float64, torch.float32):
        case = smooth(dtype, n=64)
        x, y = case.inputs.to(device), case.targets.to(device)
        data = [(x[:32], y[:32]), (x[32:], y[32:])]
        plain = copy.deepcopy(case.model).to(device)
        model = case.model.to(device)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        before = [p.to_local().clone() for p in model.parameters()]
        exact = cs.Curvature(plain, case.loss_fn, data, backend="double_backward")
        C = cs.Curvature(model, case.loss_fn, data, backend="finite_difference")
        V = torch.randn(C.num_params, 4, dtype=dtype, device=device,
                        generator=torch.Generator(device).manual_seed(0))
        H = exact.to_dense().double()
        err = float(((C @ V).double() - H @ V.double()).norm(dim=0).div(V.double().norm(dim=0)).max())
        u = torch.finfo(dtype).eps
        bound = fd.ACCURACY * u ** (2 / 3) * float(torch.linalg.matrix_norm(H, 2))
        lam = cs.eigenvalues(C, k=1, progress_bar=False).values[0].item()
        lam_ref = torch.linalg.eigvalsh(H)[-1].item()
        same = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
        print(f"{dtype}: on {device}, {type(next(model.parameters())).__name__} parameters; "
              f"|FD - Hv|/|v| = {err:.3g} (bound {bound:.3g}); lambda_max {lam:.6g} "
              f"(dense {lam_ref:.6g}); shards restored bit for bit: {same}")
        assert err <= bound and same
        assert abs(lam - lam_ref) <= 1e-3 * abs(lam_ref) + 2 * bound
    print("fsdp-cuda: ok")
finally:
    dist.destroy_process_group()
EOF

# ---------------------------------------------------------------------------- bench
# benchmarks/scale.py runs on the CPU (it has no --device yet): a GPU check that ran it would
# measure the CPU, so the quick benchmark below runs unless scale.py learns --device
if [ -f benchmarks/scale.py ] && "$PY" benchmarks/scale.py --help 2>/dev/null | grep -q -- "--device"; then
    run_part bench 150 "$PY" benchmarks/scale.py --quick --device cuda
else
    run_part bench 150 "$PY" - <<'EOF'
"""A quick product benchmark on the GPU (benchmarks/scale.py takes no --device): a causal
transformer of about 2M parameters, float32, batch 8 x 64 tokens; medians of 10 after warm-up,
each timing synchronised; one gradient against one Hessian product (cached graph, from scratch,
finite differences) and lambda_max."""
import statistics, time
import torch
from torch import nn
import curvscope as cs

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
V_, D, L, T, B = 512, 192, 4, 64, 8


class Causal(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V_, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True,
                                           activation="gelu")
        self.enc = nn.TransformerEncoder(layer, L, enable_nested_tensor=False)
        self.head = nn.Linear(D, V_)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, x):
        h = self.enc(self.emb(x) + self.pos, mask=self.mask, is_causal=True)
        return self.head(h).reshape(-1, V_)


torch.manual_seed(0)
model = Causal().to(device)
x = torch.randint(0, V_, (B, T), device=device)
y = torch.randint(0, V_, (B * T,), device=device)
loss_fn = nn.CrossEntropyLoss()
n = sum(p.numel() for p in model.parameters())


def median_ms(fn, reps=10):
    fn(); sync()
    times = []
    for _ in range(reps):
        sync(); t = time.perf_counter(); fn(); sync()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def gradient():
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()


v = torch.randn(n, device=device)
g_ms = median_ms(gradient)
model.zero_grad(set_to_none=True)
rows = []
for name, kw in [("double backward, cached", {}), ("double backward, from scratch",
                 {"cache": False}), ("finite difference", {"backend": "finite_difference"})]:
    C = cs.Curvature(model, loss_fn, (x, y), **kw)
    ms = median_ms(lambda: C @ v)
    rows.append(f"| {name} | {ms:.2f} | {ms / g_ms:.2f}x |")
C = cs.Curvature(model, loss_fn, (x, y))
sync(); t = time.perf_counter()
r = cs.eigenvalues(C, k=1, progress_bar=False)
sync()
print(f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, torch "
      f"{torch.__version__}, causal transformer, {n / 1e6:.2f}M parameters, float32\n")
print("| pass | ms (median of 10) | / one gradient |\n|---|---|---|")
print(f"| one gradient | {g_ms:.2f} | 1x |")
print("\n".join(rows))
print(f"\nlambda_max {r.values[0].item():.5g}: {r.matvecs} products, "
      f"{time.perf_counter() - t:.2f} s, converged {bool(torch.as_tensor(r.converged).all())}")
EOF
fi

echo
echo "== summary (logs in $LOGS)"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
