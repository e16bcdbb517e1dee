"""Direction and shape of two real losses, in a few lines.

Direction: the gradient norm says how steep the loss is here.
Shape: the Hessian's extreme eigenvalues say what the valley looks like — how sharp it is
(λ_max, which sets the largest stable gradient-descent step 2/λ_max) and whether some
direction curves down (λ_min < 0: not a minimum).

Run: python examples/quickstart.py
"""

import torch

import curvscope as cs


def describe(name, model, loss_fn, data):
    inputs, targets = data
    loss = loss_fn(model(inputs), targets)
    C = cs.Curvature(model, loss_fn, data)  # the Hessian of the mean loss, matrix-free
    grad = torch.autograd.grad(loss, list(model.parameters()))
    grad_norm = torch.cat([g.reshape(-1) for g in grad]).norm()
    # This model is small, so the dense Hessian (n products) and its exact spectrum are cheap.
    eig = torch.linalg.eigvalsh(C.to_dense())
    lam_min, lam_max = eig[0].item(), eig[-1].item()
    print(f"{name}: {C.num_params} parameters, loss {loss.item():.4f}")
    print(f"  direction: gradient norm {grad_norm:.4f}")
    print(
        f"  shape:     λ_max {lam_max:.4f} (gradient descent is stable for lr < "
        f"{2 / lam_max:.3g}), λ_min {lam_min:.4g}, {int((eig < 0).sum())} negative "
        f"eigenvalues"
    )
    print(
        f"  cost:      {C.matvecs} Hessian-vector products; the dense matrix alone is "
        f"{8 * C.num_params**2 / 2**20:.1f} MiB"
    )
    return lam_min, lam_max


if __name__ == "__main__":
    logreg = cs.problems.get("breast-cancer-logreg")
    lmin, _ = describe(
        "logistic regression, breast cancer", logreg.make_model(0), logreg.loss_fn, logreg.data
    )
    print(
        "  convex: no negative curvature" if lmin > -1e-10 else "  (unexpected negative curvature)"
    )

    mlp = cs.problems.get("digits-mlp", hidden=16)
    model = mlp.make_model(0)
    lmin, _ = describe("tanh MLP, digits", model, mlp.loss_fn, mlp.data)
    print(
        "  non-convex: some directions curve down, a second-order method must handle them"
        if lmin < 0
        else "  no negative curvature at this point"
    )

    # Diagnosis: what these numbers mean for a learning rate, in words.
    for lr in (0.5, 4.0):
        d = cs.diagnose(model, mlp.loss_fn, mlp.data, lr=lr)
        print(f"\ngradient descent at lr={lr}: {d.state}")
        print(f"  {d}")
