"""The ``curvscope`` command line: ``lab``, ``probe``, ``report``."""

from curvscope.cli.main import main

__all__ = ["main"]
