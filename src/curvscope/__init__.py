"""curvscope: the direction (gradient) and shape (curvature) of a loss, for any PyTorch model
or plain function — measured matrix-free, cheap enough to ask during training.

>>> import torch, curvscope as cs
>>> cs.hvp(lambda x: (x**3).sum(), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
tensor([ 6., 12.])
"""

from curvscope import diagnosis, optim, problems, spectrum
from curvscope.derivatives import DENSE_LIMIT, KINDS, Curvature, grad, hessian, hvp
from curvscope.diagnosis import (
    Diagnosis,
    Monitor,
    Thresholds,
    diagnose,
    read_log,
    stability_limit,
)
from curvscope.spectrum import density, diagonal, eigenvalues, trace, trace_of_square

__version__ = "0.1.0"

__all__ = [
    "DENSE_LIMIT",
    "KINDS",
    "Curvature",
    "Diagnosis",
    "Monitor",
    "Thresholds",
    "__version__",
    "density",
    "diagnose",
    "diagnosis",
    "diagonal",
    "eigenvalues",
    "grad",
    "hessian",
    "hvp",
    "optim",
    "problems",
    "read_log",
    "spectrum",
    "stability_limit",
    "trace",
    "trace_of_square",
]
