"""Hooks into the training frameworks people already use. Each module imports its framework
lazily, only when used: ``curvscope.integrations.lightning`` (PyTorch Lightning) and
``curvscope.integrations.transformers`` (Hugging Face ``Trainer``). TensorBoard scalars come
from :class:`curvscope.Monitor` itself (``tensorboard=``)."""
