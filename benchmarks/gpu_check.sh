#!/usr/bin/env bash
# The GPU check: everything curvscope promises on CUDA, in one run of under 8 minutes.
#
#     bash benchmarks/gpu_check.sh            # on a machine with a CUDA device
#
# Run from anywhere; nothing is installed. The Python is $PYTHON, else the project's virtual
# environment (.venv) if there is one, else python3; the source tree is put on PYTHONPATH, so
# an environment that has torch and pytest (and, for the peers' columns, pyhessian and
# hessian_eigenthings) will do. Each part runs under its own timeout (the caps add up to
# 420 s), writes its full output to $GPU_CHECK_LOGS (default: a fresh temporary directory) and
# one line to the summary printed at the end; the exit status is 0 only when every part passed.
#
#   env        torch, CUDA and the device, and that CUDA works at all             30 s
#   devices    tests/test_devices.py: every estimator, diagnose, the Monitor and
#              bfloat16 products on cuda against the float64 CPU reference, and
#              Lanczos's synchronisations counted by CUDA itself                 150 s
#   fsdp-cuda  FSDP2 (fully_shard, NCCL, one rank) on the GPU: the sharded
#              model's finite-difference products against the exact product,
#              and λ_max and diagnose(sharded=True) on sharded vectors            60 s
#   bench      benchmarks/scale.py --device cuda --fd: every size, the peers
#              in the same process, finite differences in a second table         180 s
#
# The two-process FSDP2 runs (gloo, CPU) are in the test suite, which CI runs without a GPU.
# GPU_CHECK_PARTS=env,devices (a comma list) runs only those parts.
# GPU_CHECK_ALLOW_CPU=1 runs the same parts without a GPU (cpu in place of cuda): a dry run
# of this script's own logic, not a check of anything CUDA.
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t curvscope-gpu-check.XXXXXX)}
mkdir -p "$LOGS"
export PYTHONPATH=src:.${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=()
FAILED=0

# run_part NAME SECONDS COMMAND...: run under a timeout, log, and record one summary line
run_part() {
    local name=$1 limit=$2
    shift 2
    case ",${GPU_CHECK_PARTS:-env,devices,fsdp-cuda,bench}," in
    *",$name,"*) ;;
    *) return 0 ;;
    esac
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
import curvscope
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("curvscope from", os.path.dirname(curvscope.__file__))
for peer in ("pyhessian", "hessian_eigenthings"):
    try:
        __import__(peer)
        print(peer, "importable: its columns of the benchmark will be filled")
    except ImportError:
        print(peer, "not importable: its columns of the benchmark will say so")
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
# -rs lists the skipped ones (on a GPU machine no cuda instance may be skipped); -rP shows what
# the passing tests printed (the synchronisation counts)
run_part devices 150 "$PY" -m pytest -q -p no:cacheprovider -rsP tests/test_devices.py
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    && [ -f "$LOGS/devices.log" ] && grep -q "SKIPPED" "$LOGS/devices.log"; then
    SUMMARY+=("FAIL    devices: cuda instances were skipped on a machine with CUDA")
    FAILED=1
fi

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
        # sharded vectors (one rank: its shard is the whole), and the diagnosis on them
        lam_s = cs.eigenvalues(C.sharded(), k=1, progress_bar=False).values[0].item()
        d = cs.diagnose(model, case.loss_fn, data, lr=0.5, backend="finite_difference",
                        sharded=True)
        want = cs.diagnose(plain, case.loss_fn, data, lr=0.5)
        s, s_ref = d.evidence["sharpness"], want.evidence["sharpness"]
        same = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
        print(f"  sharded: lambda_max {lam_s:.6g}; diagnose(sharded=True) {d.state.value}, "
              f"sharpness {s:.6g} (exact, whole vectors: {want.state.value}, {s_ref:.6g}); "
              f"shards restored: {same}")
        assert abs(lam_s - lam_ref) <= 1e-3 * abs(lam_ref) + 2 * bound
        assert d.state == want.state and same
        assert abs(s - s_ref) <= 1e-2 * abs(s_ref) + 2 * bound
    print("fsdp-cuda: ok")
finally:
    dist.destroy_process_group()
EOF

# ---------------------------------------------------------------------------- bench
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    run_part bench 180 "$PY" benchmarks/scale.py --device cuda --fd
else  # the dry run: the smallest size, on the CPU
    run_part bench 180 "$PY" benchmarks/scale.py --sizes 0.2M --rounds 2 --fd
fi

echo
echo "== summary (logs in $LOGS)"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
