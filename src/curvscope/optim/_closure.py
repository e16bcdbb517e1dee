"""What every curvscope optimizer needs from the user's closure: the loss, its gradient, and
curvature products — all from one forward pass, without the user's loop doing anything special.

The closure is called with gradients enabled. If it calls ``loss.backward()`` itself (the
``torch.optim.LBFGS`` habit), that backward runs with ``retain_graph=True`` so that the graph is
still there for our own derivatives; ``.grad`` is filled as the closure expects (that backward
is an extra gradient, and counted as one). Loss-only evaluations (trial points of a trust
region or line search, Hessian-free's curvature mini-batch) run the closure as written too —
gradients enabled, so a loss that differentiates itself (a physics-informed residual, a
gradient penalty) works, and its own ``backward()``, if it calls one, counted as a gradient
and run into the optimized parameters' ``.grad`` only, so a closure that reads ``.grad`` finds
it — and then undo what it did: ``.grad`` is put back as it was, and so are the running
statistics of the normalization layers that ran (a trial point, often rejected, is not a
training step; the evaluation at the start of the step updates them once, as a first-order
step does).

Under torch.distributed (``group``: :func:`~curvscope.derivatives.distributed.resolve_group`)
each rank's closure computes its own shard's loss, as under DDP; the loss, the gradient, every
curvature product and every trial loss are averaged over the ranks (DDP's mean), so every rank
takes the same step and the replicas stay equal, and the ranks agree on each evaluation's
success before anything else (:func:`_call`).

The interception is local: a ``torch.overrides.TorchFunctionMode`` active around the closure
call, on this thread only, catches ``Tensor.backward`` and ``torch.autograd.backward`` (both
dispatch through ``__torch_function__`` in torch 2.13); nothing global is patched, so another
thread's backward at that moment is untouched. What a mode costs: every torch call of the
closure passes through one Python function (1.4-1.8 µs a call measured on a CPU; a forward
pass makes about one call per module, not per tensor). Every evaluation runs with gradients
enabled, so torch's fused inference paths (``nn.MultiheadAttention``'s and
``nn.TransformerEncoderLayer``'s fast path, taken only in eval mode without gradients) are not
taken: trial losses and evaluated losses are computed alike.

A closure may return the loss or a pair ``(loss, outputs)``; with the outputs, Gauss-Newton
products (Jᵀ H_out J) and the Gauss-Newton-Bartlett estimator become available.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvscope.derivatives.checks import PACKAGE, callers_level
from curvscope.derivatives.distributed import all_reduce_mean, all_reduce_sum, collective_device
from curvscope.derivatives.flat import flatten, unflatten
from curvscope.derivatives.kinds import PreparedProduct, ggn_product, hessian_product
from curvscope.derivatives.objective import (
    REENTRANT_SAID,
    DifferentiableKernels,
    reentrant_refusal,
    watch_custom_functions,
)
from curvscope.derivatives.substitutes import substitute

Closure = Callable[[], Any]


@dataclass
class Counts:
    """The work an optimizer has done, each kind counted on its own.

    closure_calls: forward passes of the closure (with or without a gradient);
    gradients: gradients computed (backward passes through the loss);
    products: curvature-vector products (Hessian or Gauss-Newton);
    hessians: dense Hessians formed (each also costs n products, counted there);
    cg_iterations, lanczos_iterations: inner iterations of the subproblem solvers.
    """

    closure_calls: int = 0
    gradients: int = 0
    products: int = 0
    hessians: int = 0
    cg_iterations: int = 0
    lanczos_iterations: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


#: What a user's backward inside the closure goes through (``Tensor.backward`` dispatches to
#: ``torch.autograd.backward``; a mode sees whichever the closure calls first).
_BACKWARDS = (torch.Tensor.backward, torch.autograd.backward)


class _ClosureBackward(TorchFunctionMode):
    """Around a closure call, on this thread: a backward the closure calls is counted as a
    gradient in ``counts`` and run, the graph retained for our own derivatives, as ``mode``
    says. ``as_written``: counted only (a first-order method that reads ``.grad``). ``keep``
    (the evaluation where a step starts): torch's own backward, so ``.grad`` is
    filled as the closure expects — every leaf's, DDP's hooks included. ``contained`` (trial
    points, a curvature mini-batch): the closure's backward differentiates into the optimized
    ``params`` only, as fresh ``.grad`` tensors (accumulated, as backward accumulates), and
    touches nothing else — not another module's or an input's ``.grad``, not DDP's gradient
    buckets. Every other torch call passes through unchanged (but for the weight norm's
    substitute)."""

    def __init__(self, mode: str, counts: Counts, params: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.mode, self.counts, self.params = mode, counts, params

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func not in _BACKWARDS:
            # torch's weight norm has a wrong double backward: the formula written out instead
            return (substitute(func) or func)(*args, **kwargs)
        self.counts.gradients += 1
        if self.mode == "as_written":
            return func(*args, **kwargs)
        if self.mode == "keep":
            kwargs["retain_graph"] = True  # inside the handler the mode is off: the real one
            return func(*args, **kwargs)
        self._contained(func, list(args), kwargs)
        return None

    def _contained(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
        """``Tensor.backward(gradient, retain_graph, create_graph)`` or ``autograd.backward(
        tensors, grad_tensors, retain_graph, create_graph)`` into ``params`` only."""
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph")
        if func is torch.Tensor.backward:
            names = ("tensors", "gradient", "retain_graph", "create_graph")
        given = dict(zip(names, args, strict=False)) | kwargs
        outputs, grads = given["tensors"], given.get(names[1])
        outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        grads = [grads] if grads is None or isinstance(grads, Tensor) else list(grads)
        if len(grads) == 1 and grads[0] is None:
            grads = grads * len(outputs)
        wanted = [p for p in self.params if p.requires_grad]
        found = torch.autograd.grad(
            outputs,
            wanted,
            grads,
            retain_graph=True,
            create_graph=bool(given.get("create_graph", False)),
            allow_unused=True,
        )
        for p, g in zip(wanted, found, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g


class KeptStatistics:
    """Around an evaluation that is not the step's own: the buffers a forward writes in place
    — the running statistics (and batch counts) of every normalization layer, spectral norm's
    power-iteration vectors, an average of your own — of every module that runs inside, on
    this thread, are put back on exit (spectral norm's moved at every trial point, and a
    rolled-back step's retry ended 3e-3 from a run that never faulted: an outside review) —
    through ``.data``, which leaves the buffers' version counters alone: a graph kept
    for products saved them (a train-mode backward does not read their values), and an
    in-place write it could see would fail its backward. Found by a global forward pre-hook,
    there only while the evaluation runs; another thread's modules are left alone. Each
    buffer is saved once, as the first module that holds it runs (a buffer two modules share
    was put back as the second found it), and a buffer of more than :data:`KEPT_BUFFER_LIMIT`
    entries is taken for a constant (a mask, a table) and not copied — except a normalization
    layer's: cloning a 16 MB mask at every step made a small model's step 4.7x slower (the
    diff review). A buffer resized since (an observer's first forward) gets its old tensor
    back, and putting back never raises over the error in flight.

    ``on_error=True``: put back only when the block raises — around a whole step, whose own
    evaluation updates them once, as a forward does, unless the step fails (a refused step
    had left BatchNorm's running mean NaN and its batch count moved: an outside review)."""

    def __init__(self, on_error: bool = False) -> None:
        self.on_error = on_error

    #: those entered and not yet exited, for :func:`undo_interrupted_exits`
    _open: ClassVar[set[KeptStatistics]] = set()

    def __enter__(self) -> KeptStatistics:
        self.seen: set[nn.Module] = set()
        self.saved: dict[int, tuple[Tensor, Tensor]] = {}  # id(buffer) -> (buffer, its copy)
        self.thread = threading.get_ident()
        self.handle = nn.modules.module.register_module_forward_pre_hook(self._seen)
        KeptStatistics._open.add(self)
        return self

    def _seen(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() != self.thread or module in self.seen:
            return
        self.seen.add(module)
        norm = isinstance(module, nn.modules.batchnorm._NormBase)
        for b in module.buffers(recurse=False):
            # (one written in inference mode, which outside it can be neither written nor
            # put back, is left)
            if id(b) in self.saved or b.is_inference():
                continue
            if norm or b.numel() <= KEPT_BUFFER_LIMIT:
                self.saved[id(b)] = (b, b.detach().clone())

    def __exit__(self, kind: object, *exc: object) -> None:
        self.handle.remove()
        KeptStatistics._open.discard(self)
        if self.on_error and kind is None:
            return
        self.put_back()

    def put_back(self) -> None:
        for buffer, value in self.saved.values():  # (every one: BatchNorm's kernel writes
            try:  # its statistics without moving their version counters)
                if buffer.shape == value.shape:
                    buffer.data.copy_(value)
                else:  # resized in place since: its old tensor back
                    buffer.data = value
            except RuntimeError:  # (never over the error in flight)
                continue


#: the most entries a buffer :class:`KeptStatistics` copies may have (a normalization layer's
#: are copied whatever their size): larger ones are taken for constants
KEPT_BUFFER_LIMIT = 1 << 20


def undo_interrupted_exits(step: KeptStatistics) -> None:
    """What an exit cut short left behind, after a step raised: a Ctrl-C (an asynchronous
    KeyboardInterrupt) that lands as an ``__exit__`` is entered skips it, and left
    :class:`_ClosureBackward` on torch's function-mode stack for the rest of the process (a
    later plain ``backward()`` filled no ``.grad``) or this thread's forward pre-hook
    registered and BatchNorm's running statistics moved (an outside review's random SIGINTs).
    Pops this module's modes off the top of the stack, removes this thread's open hooks, and
    puts the statistics ``step`` saw back. Idempotent."""
    while isinstance(torch.overrides._get_current_function_mode(), _ClosureBackward):
        torch.overrides._pop_mode()
    thread = threading.get_ident()
    for kept in [k for k in KeptStatistics._open if k.thread == thread]:
        kept.handle.remove()
        KeptStatistics._open.discard(kept)
    step.put_back()


def _split(out: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, tuple | list) and len(out) == 2:
        loss, outputs = out
    else:
        loss, outputs = out, None
    if not isinstance(loss, Tensor):
        raise TypeError(
            "the closure must return the loss as a torch.Tensor (or a pair (loss, outputs)), "
            f"got {type(loss).__name__}; end it with `return loss`"
            + (" (of a model's output object: `return out.loss`)" if hasattr(loss, "loss") else "")
        )
    if loss.numel() != 1:
        raise ValueError(
            f"the closure must return a scalar loss, got shape {tuple(loss.shape)}; "
            "reduce it with .mean() or .sum()"
        )
    if outputs is not None and not isinstance(outputs, Tensor):
        # named by type: a Hugging Face ModelOutput's repr printed 1,600 characters of tensors
        logits = " (a model's output object: return its logits, (out.loss, out.logits))"
        raise TypeError(
            "the closure's second value must be the outputs tensor, got "
            f"{type(outputs).__name__}" + (logits if hasattr(outputs, "logits") else "")
        )
    return loss.reshape(()), outputs


def origin(loss: Tensor) -> Tensor:
    """The tensor a closure returned, before :func:`_split` reshaped it (a view of it then):
    the same object at every call of a closure that recomputes nothing (:func:`loss_only`)."""
    return loss if loss._base is None else loss._base


def model_outputs(ev: Any) -> Tensor:
    """The closure's outputs, where a method goes through them (Gauss-Newton products,
    Sophia-G's sampled labels): refused, with the fix, when there are none or they are not the
    model's — a metric returned second, ``(loss, accuracy)``, gave torch's "One of the
    differentiated Tensors does not require grad" and an IndexError (an outside review)."""
    outputs = ev.outputs
    if outputs is None:
        raise ValueError(
            "this method goes through the model's outputs: let the closure return "
            "(loss, outputs), or use curvature='hessian'"
        )
    if not outputs.requires_grad and ev.loss_tensor.requires_grad:
        raise ValueError(
            "the closure's second value is taken as the model's outputs (Gauss-Newton products "
            "and Sophia-G's sampled labels go through them), and this one does not depend on "
            "the parameters — a metric (an accuracy) or a detached copy? Return (loss, outputs) "
            "with the outputs the loss was computed from, or the loss alone"
        )
    return outputs


def read_around_outputs(loss: Tensor, outputs: Tensor, params: Sequence[Tensor]) -> int | None:
    """The index in ``params`` of a parameter that ``loss`` reads other than through
    ``outputs`` (a penalty on the parameters, on an activation before the outputs, a
    parameter of the loss itself), or None: one walk over the loss's graph that does not
    enter the outputs' node — only the loss's own operations when it reads the outputs alone.
    A Gauss-Newton product Jᵀ H_out J has the curvature of the part through the outputs
    only: with (CE(out) + λ/2‖θ‖², out) it was G_CE, not G_CE + λI, without a word, and
    Hessian-free took 27 steps where the Hessian's took 4 (a review)."""
    ids = {id(p): i for i, p in enumerate(params)}
    # the outputs are one output of their node: a node of several (a split into the logits and
    # an auxiliary head) reached through another is read around them (a review: CE(logits) +
    # 10·aux² with logits, aux = out.split(...) was not seen)
    stop = (outputs.grad_fn, outputs.output_nr)
    seen: set[Any] = set()
    stack = [(loss.grad_fn, 0)]
    while stack:
        node, nr = stack.pop()
        if node is None or (node, nr) == stop or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf tensor
        if leaf is not None:
            if leaf is not outputs and id(leaf) in ids:
                return ids[id(leaf)]
            continue
        stack.extend(node.next_functions)
    return None


def check_closure(closure: Any, name: str) -> Closure:
    if closure is None:
        raise ValueError(
            f"{name}.step needs a closure that re-evaluates the model and returns the loss, "
            "e.g. opt.step(lambda: loss_fn(model(x), y)); it differentiates the loss itself"
        )
    if not callable(closure):
        raise TypeError(f"{name}.step expected a callable closure, got {type(closure).__name__}")
    return closure


@contextlib.contextmanager
def _undone(params: Sequence[Tensor]) -> Iterator[None]:
    """Around an evaluation that is not the step's own (a trial point, a curvature
    mini-batch): ``.grad`` of ``params`` is the same tensors afterwards — taken out of the
    closure's reach while it runs, so its ``zero_grad()`` cannot zero them in place."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g


@dataclass
class _Called:
    """A closure call: its loss and outputs, the loss's mean over the group, and whether the
    closure ran its own backward here and on any rank."""

    loss: Tensor
    outputs: Tensor | None
    mean: float
    ran_here: bool
    ran_anywhere: bool

    def check_finite(self) -> None:
        """Refuse a non-finite loss at the current parameters (every rank sees the same mean:
        a non-finite one too), before anything is written."""
        if not math.isfinite(self.mean):
            raise FloatingPointError(
                f"the closure returned a non-finite loss ({self.mean}) at the current "
                "parameters: nothing to optimize from; check the data and the initialisation"
            )


def _warn_written(params: Sequence[Tensor], versions: list[int]) -> None:
    """A closure that writes into the parameters it is called to evaluate (a projection, a
    clamp, ``nn.Embedding(max_norm=...)``'s renormalisation in the forward) moves the point a
    step is computed at: a model-step method's step comes from the point as written but starts
    from the point before (NewtonCG dropped a change of 0.1, or kept a trial point's on top of
    its step, its ``step_norm`` 0.50 for a move of 1.04), unsaid (an outside review). Said;
    not refused — torch's own max-norm embedding writes so, and torch's optimizers take it."""
    written = [i for i, (p, v) in enumerate(zip(params, versions, strict=True)) if p._version != v]
    if written:
        warnings.warn(
            "the closure wrote into the parameters it evaluates (in place: a projection, a "
            "clamp, nn.Embedding(max_norm=...)): the step is computed at the point as written, "
            "and a second-order method's step starts from the point before it. Apply a "
            "constraint after optimizer.step(), or as a parametrization "
            "(torch.nn.utils.parametrize)",
            ClosureWroteWarning,
            stacklevel=4,
        )


class ClosureWroteWarning(UserWarning):
    """A closure wrote into the parameters it was called to evaluate (:func:`_warn_written`)."""


class ClosureGradIgnoredWarning(UserWarning):
    """A closure clipped, scaled or masked ``.grad``, which a model-step method does not read
    (:func:`warn_grad_edits`)."""


#: rounding allowed between ``.grad`` as a closure's backward left it and the method's own
#: gradient of its loss, relative to each entry
EDIT_TOLERANCE = 1e-4


def grad_edited(params: Sequence[Tensor], own: Sequence[Tensor]) -> bool:
    """Whether a closure that ran its own backward left ``.grad`` reduced against ``own``, the
    gradient of its loss: no entry larger or of the other sign, and some entry smaller by more
    than rounding, or a parameter's ``.grad`` None while its gradient is not 0 — clipping (by
    norm or by value, over all parameters or some), masking (a parameter or some of its rows),
    scaling down. ``.grad`` accumulated over calls without ``zero_grad``, or averaged over
    ranks by DDP, is larger somewhere. One read of the device (it was five a parameter, and
    0.39 s a step at 8.4M parameters: a review)."""
    within: list[Tensor] = []
    reduced: list[Tensor] = []
    for p, o in zip(params, own, strict=True):
        g, o = p.grad, o.detach()
        if g is None:
            reduced.append(o.ne(0).any())
            continue
        g = g.detach()
        size, own_size = g.abs(), o.abs()
        within.append(((size <= own_size * (1 + EDIT_TOLERANCE)) & (g * o >= 0)).all())
        reduced.append((size < own_size * (1 - EDIT_TOLERANCE)).any())
    if not reduced:
        return False
    if within:
        return bool(torch.stack(within).all() & torch.stack(reduced).any())
    return bool(torch.stack(reduced).any())


def warn_grad_edits(name: str, params: Sequence[Tensor], own: Sequence[Tensor]) -> None:
    """A model-step method (Newton, NewtonCG, HessianFree, SaddleFreeNewton, CubicNewton) steps
    on the gradient and the curvature of the closure's loss, which it differentiates itself:
    a closure that clipped or masked ``.grad`` — the README's advice for AdaHessian and Sophia
    — changed nothing, in silence (clipped to 1e-3, five NewtonCG steps bit for bit the
    unclipped ones; a layer whose ``.grad`` was zeroed moved by 0.28–0.98: an outside
    review). Said, with what does reach such a method."""
    if not grad_edited(params, own):
        return
    warnings.warn(
        f"the closure clipped, scaled or masked .grad, which {name} does not read: it steps on "
        "the gradient and curvature of the closure's loss, which it differentiates itself. To "
        "leave a parameter out, leave it out of the optimizer (or set requires_grad=False); "
        "the step's size is bounded by the method's own radius, damping or regularisation, "
        "not by clipping",
        ClosureGradIgnoredWarning,  # at the user's step() call, past torch's step wrappers
        stacklevel=callers_level((PACKAGE, os.path.dirname(torch.__file__))),
    )


def _call(
    closure: Closure,
    counts: Counts,
    params: Sequence[Tensor],
    mode: str,
    group: Any,
    needs_graph: bool = False,
    kernels: contextlib.AbstractContextManager[Any] | None = None,
) -> _Called:
    """Call the closure (gradients enabled, its backward as ``mode`` says; under ``kernels``,
    :meth:`Evaluation.kernels`, where given). Under a group the
    ranks first agree, in the one all-reduce of [loss, failed, ran a backward] that averages
    the loss, on whether every rank's call succeeded: a closure that raises on one rank — an
    out-of-memory error at a trial point, a bad shard — raises there and, naming it, on every
    other rank, where before the others went on into a collective paired with the wrong one
    (an outside review: a mixed loss, then gloo's abort)."""
    backwards = counts.gradients
    counts.closure_calls += 1
    error: Exception | None = None
    loss = outputs = None
    try:
        versions = [p._version for p in params]
        with (
            kernels or contextlib.nullcontext(),
            torch.enable_grad(),
            _ClosureBackward(mode, counts, params),
        ):
            loss, outputs = _split(closure())
        _warn_written(params, versions)
        if needs_graph and not loss.requires_grad and torch.is_inference_mode_enabled():
            raise RuntimeError(
                "the step was called under torch.inference_mode(), in which nothing is "
                "differentiable: call opt.step outside it"
            )
        if needs_graph and not loss.requires_grad and counts.gradients > backwards:
            # Lightning's automatic optimization: its closure runs the backward and returns
            # loss.detach(), and the error named a fix the user had made (an outside review)
            raise ValueError(
                "the closure ran a backward and then returned its loss detached from the graph "
                "(PyTorch Lightning's automatic optimization does: its closure returns "
                "loss.detach()), and this optimizer differentiates the loss again. Return the "
                "loss itself from the closure; under Lightning use manual optimization "
                "(self.automatic_optimization = False, then opt.step(closure=...) with a closure "
                "that computes and returns the loss)"
            )
        if needs_graph and not loss.requires_grad:
            raise ValueError(
                "the closure's loss does not depend on the optimized parameters; "
                "compute it from the model inside the closure"
            )
    except Exception as e:
        if group is None:
            raise
        error = e
    ran = counts.gradients > backwards
    if group is None:
        assert loss is not None
        return _Called(loss, outputs, float(loss.detach()), ran, ran)
    where = collective_device(group, params[0].device)
    flags = torch.tensor([error is not None, ran], dtype=torch.float64, device=where)
    value = flags.new_zeros(1) if loss is None else loss.detach().reshape(1).to(flags)
    # [Σ loss, how many failed, how many ran a backward]: one collective, one read
    total, failed, ran_anywhere = all_reduce_sum(torch.cat([value, flags]), group).tolist()
    if error is not None:
        raise error
    if failed > 0:
        raise RuntimeError(
            f"curvscope: the closure raised on {int(failed)} other rank(s) at this "
            "evaluation (their error is theirs to show): every rank stops the step, and its "
            "transaction puts the parameters and the state back"
        )
    assert loss is not None
    world = int(torch.distributed.get_world_size(group))
    return _Called(loss, outputs, total / world, ran, ran_anywhere > 0)


def loss_only(
    closure: Closure,
    params: Sequence[Tensor],
    counts: Counts,
    group: Any = None,
    start: weakref.ref[Tensor] | None = None,
) -> float:
    """The closure's loss at the current parameters (a trial point; the mean over ``group``),
    the closure run as written (see the module's docstring) and its traces undone:
    ``.grad`` (:func:`_undone`) and the normalization layers' statistics. ``start``: the
    step's own loss, which a closure that recomputes nothing returns again (refused)."""
    with _undone(params), KeptStatistics():
        kernels = DifferentiableKernels.for_closures()  # as the evaluation's: the same loss
        called = _call(closure, counts, params, "contained", group, kernels=kernels)
    if start is not None and start() is origin(called.loss):
        # ``loss = f(x); opt.step(lambda: loss)``: every trial point's loss was the start's, and
        # NewtonCG rejected 20 steps in a row, its radius down to 9e-13, unsaid (an outside
        # review)
        raise ValueError(
            "the closure returned the same loss tensor at a trial point as at the step's start: "
            "it must compute the loss from the model at each call (a closure such as "
            "`lambda: loss` over a loss computed before step() never sees the points the step "
            "tries); define it to run the forward pass: def closure(): return loss_fn(model(x), y)"
        )
    return called.mean


#: What torch says of a backward through a compiled graph taken with ``create_graph=True``
#: (which of the two depends on what dynamo compiled before: both were seen in one session).
_COMPILED_SAID = (
    "does not currently support double backward",
    "compiled with non-empty donated buffers",
)
#: A compiled module's graphs have no double backward: torch's bare error, explained.
COMPILED = (
    "the closure runs a torch.compile'd module, whose compiled graphs have no double backward "
    "(torch.compile with aot_autograd), so no curvature product can go through it: call the "
    "original module in the closure — model._orig_mod, the one torch.compile wrapped, which "
    "shares its parameters — for the second-order optimizers"
)


@contextlib.contextmanager
def _compiled_named() -> Iterator[None]:
    """torch's errors for a backward with ``create_graph=True`` through a compiled graph, as
    :data:`COMPILED` (the module named, with the fix), and through a reentrant checkpoint, as
    :func:`~curvscope.derivatives.objective.reentrant_refusal` (a gradient the walk over the
    graph did not see: :func:`~curvscope.derivatives.objective.watch_custom_functions`)."""
    try:
        yield
    except RuntimeError as e:
        if any(said in str(e) for said in _COMPILED_SAID):
            raise RuntimeError(COMPILED) from e
        if REENTRANT_SAID[1] in str(e):
            raise RuntimeError(reentrant_refusal("a second-order optimizer")) from e
        raise


class Evaluation:
    """The closure at the current parameters: loss, gradient, and curvature products.

    With ``curvature`` (the default) the gradient graph is kept (``create_graph=True``), so a
    Hessian-vector product is one more backward pass through it (Pearlmutter 1994); with the
    closure's outputs, Gauss-Newton products come from the same forward pass. Both products
    are ``derivatives.kinds``' own (:func:`~curvscope.derivatives.kinds.hessian_product`,
    :func:`~curvscope.derivatives.kinds.ggn_product`), the ones ``cs.Curvature`` uses.

    The closure, the gradient and the products then run on kernels that have second
    derivatives, as ``cs.Curvature``'s do (:attr:`kernels`): attention on the math backend
    of scaled-dot-product attention (torch's fused CPU and GPU kernels have no double
    backward: every second-order step of a model with ``nn.TransformerEncoderLayer`` failed),
    cuDNN off, compiled code run eagerly once torch.compile has been used. A trial point's
    loss (:func:`loss_only`) runs on the same kernels, so that the losses a step compares are
    computed alike.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        closure: Closure,
        counts: Counts,
        curvature: bool = True,
        group: Any = None,
        undone: bool = False,
        first_order: bool = False,
        watched: bool = True,
    ) -> None:
        """``watched``: with ``curvature``, the custom autograd Functions whose backward leaves
        the graph are refused at the products through it (an estimator that takes first
        derivatives only, Sophia-G's, is not: it is right through them).

        ``undone``: an evaluation that is not the step's own (Hessian-free's curvature
        mini-batch): the closure's backward is contained and its traces undone, as at a trial
        point (:func:`_undone`), and only its products serve (its gradient stays this rank's,
        unchecked). ``first_order``: also which parameters are stepped along (:attr:`used`)
        and the gradient a closure's own backward left (:attr:`closure_grad`), for the methods
        that step along the gradient (AdaHessian, Sophia)."""
        self.params, self.counts, self.group = list(params), counts, group
        #: the kernel switches the closure, the gradient and the products run under
        self.kernels: contextlib.AbstractContextManager[Any] = (
            DifferentiableKernels.for_closures() if curvature else contextlib.nullcontext()
        )
        with (
            _undone(self.params) if undone else contextlib.nullcontext(),
            KeptStatistics() if undone else contextlib.nullcontext(),
        ):
            mode = "contained" if undone else "keep"
            called = _call(closure, counts, self.params, mode, group, True, self.kernels)
            left = [p.grad for p in self.params] if first_order and called.ran_here else None
        #: whether the closure ran its own backward (``.grad`` is then as it left it)
        self.ran_backward = called.ran_here
        self._derive(called, left, curvature, undone, first_order, watched)

    def _derive(
        self,
        called: _Called,
        left: list[Tensor | None] | None,
        curvature: bool,
        undone: bool,
        first_order: bool,
        watched: bool = True,
    ) -> None:
        """The loss, the gradient (kept for products with ``curvature``) and, ``first_order``,
        which parameters are stepped along and the gradient the closure left."""
        group, counts = self.group, self.counts
        called.check_finite()
        loss = called.loss
        self.loss_tensor, self.outputs, self.loss = loss, called.outputs, called.mean
        seed = None
        if curvature and watched:  # refused where a custom Function's backward cuts the graph
            seed = watch_custom_functions(loss, "a second-order optimizer")
        with self.kernels, torch.enable_grad(), _compiled_named():
            grads = torch.autograd.grad(
                loss, self.params, seed, create_graph=curvature, allow_unused=True
            )
        counts.gradients += 1
        if any(g is not None and g.is_sparse for g in grads):
            raise TypeError(
                "a parameter's gradient is sparse (nn.Embedding(..., sparse=True)): curvscope's "
                "optimizers take dense gradients, as their curvature products need; build the "
                "embedding with sparse=False (the same values)"
            )
        self._hessian = hessian_product(self.params, grads)
        self.grads = self._hessian.grads
        own = [g.detach() for g in self.grads]
        self._ggn: PreparedProduct | None = None
        #: per parameter, whether it is stepped along (first_order only)
        self.used: list[bool] | None = None
        #: ``.grad`` as a closure's own backward left it (first_order only)
        self.closure_grad: Tensor | None = None
        if undone:  # only its products serve: the step's own evaluation has the gradient
            self.flat_grad = flatten(own)
            return
        if first_order:
            self._first_order(grads, left, own, called.ran_anywhere)
        else:
            self.flat_grad = all_reduce_mean(flatten(own), group)
        if not torch.isfinite(self.flat_grad).all():
            raise FloatingPointError(
                "the gradient has non-finite entries at the current parameters; "
                "check the model for overflow (a smaller step, or float64)"
            )

    def _first_order(
        self,
        grads: Sequence[Tensor | None],
        left: list[Tensor | None] | None,
        own: list[Tensor],
        ran_anywhere: bool,
    ) -> None:
        """The gradient's mean over the ranks, with :attr:`used`: whether each parameter is
        stepped along (on some rank) — used by the loss, and not masked by a closure that set
        its ``.grad`` to None after its backward: torch's optimizers skip a parameter whose
        ``.grad`` is None, and AdaHessian and Sophia do too — and :attr:`closure_grad`:
        ``.grad`` as a closure that runs its own backward left it — clipped, masked — for
        their first moment, as torch's optimizers read it (a rank whose closure ran none gives
        its own gradient); None when no rank's ran one. Under a group all three are one
        all-reduce of their concatenation (three before, each a synchronisation)."""
        masked = [False] * len(grads) if left is None else [g is None for g in left]
        used = [float(g is not None and not m) for g, m in zip(grads, masked, strict=True)]
        parts = [flatten(own)]
        if ran_anywhere:
            mine = (
                own
                if left is None
                else [
                    torch.zeros_like(p) if g is None else g.detach()
                    for g, p in zip(left, self.params, strict=True)
                ]
            )
            parts.append(flatten(mine))
        if self.group is not None:  # a parameter is used if it is on any rank: mean > 0
            parts.append(parts[0].new_tensor(used))
            parts = list(
                all_reduce_mean(torch.cat(parts), self.group).split([t.numel() for t in parts])
            )
            used = parts.pop().tolist()
        self.used = [u > 0 for u in used]
        self.flat_grad = parts[0]
        self.closure_grad = parts[1] if ran_anywhere else None

    @property
    def n(self) -> int:
        return self.flat_grad.numel()

    def _product(self, product: PreparedProduct, V: Tensor) -> Tensor:
        """A prepared product of V (n, k), through per-parameter blocks (k, *shape)."""
        blocks = unflatten(V.to(self.flat_grad), [p.shape for p in self.params])
        with self.kernels, _compiled_named():
            applied = product.apply(blocks)
        out = all_reduce_mean(flatten(applied, batched=True), self.group)
        self.counts.products += V.shape[1]
        return out

    def hvp(self, V: Tensor) -> Tensor:
        """H V for V of shape (n, k)."""
        with torch.enable_grad():
            return self._product(self._hessian, V)

    def check_outputs_alone(self, outputs: Tensor, fix: str) -> None:
        """Refuse a loss that reads the parameters other than through ``outputs``
        (:func:`read_around_outputs`), naming ``fix``."""
        read = read_around_outputs(self.loss_tensor, outputs, self.params)
        if read is None:
            return
        raise ValueError(
            f"the closure's loss reads the optimized parameter {read} (shape "
            f"{tuple(self.params[read].shape)}) other than through the outputs it returned — an "
            "L2 penalty on the parameters, a penalty on an activation, a parameter of the loss "
            "itself, or outputs that are not the tensor the loss was computed from — and the "
            "Gauss-Newton matrix Jᵀ H_out J holds the curvature of what goes through the outputs "
            "only: that term's would be left out (an L2 penalty λ/2‖θ‖² gives G, not G + λI). "
            + fix
        )

    def ggn(self, V: Tensor) -> Tensor:
        """Jᵀ H_out J V: the Gauss-Newton product, from the closure's (loss, outputs).

        Raises:
            ValueError: the closure's loss reads the parameters other than through the
                outputs (:func:`read_around_outputs`): that term's curvature is not in
                Jᵀ H_out J.
        """
        outputs = model_outputs(self)
        with torch.enable_grad():
            if self._ggn is None:
                self.check_outputs_alone(
                    outputs,
                    "Use curvature='hessian', which counts every term's curvature (the "
                    "penalty's λI included), or return (loss, outputs) with the loss computed "
                    "from the outputs alone",
                )
                with self.kernels:  # its backward passes recompute checkpointed forwards
                    self._ggn = ggn_product(outputs, self.params, self.loss_tensor)
            return self._product(self._ggn, V)  # (on the kernels too)


def flat_params(params: Sequence[Tensor]) -> Tensor:
    """The parameters' values as one flat vector (a copy)."""
    return flatten([p.detach() for p in params])


def write_flat(params: Sequence[Tensor], x: Tensor) -> None:
    """Copy a flat vector into the parameters (in place, under no_grad), and drop autocast's
    cached low-precision copies of them (:func:`parameters_written`)."""
    with torch.no_grad():
        for p, value in zip(params, unflatten(x, [p.shape for p in params]), strict=True):
            p.copy_(value)
    parameters_written()


RngState = tuple[Tensor, "list[Tensor] | None"]


def rng_now() -> RngState:
    """torch's global RNG states: the CPU generator's, and the CUDA ones where CUDA is in use
    (reading them initializes none)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def rng_back(state: RngState) -> None:
    """Put torch's global RNG states back to ``state`` (:func:`rng_now`)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def parameters_written() -> None:
    """After parameters were written in place: inside a ``torch.autocast`` region autocast
    keeps each parameter's low-precision copy until the outermost region exits, and a step
    taken inside one measured every trial point at the old weights — each step rejected, the
    trust region collapsing, without a word (an outside review)."""
    torch.clear_autocast_cache()
