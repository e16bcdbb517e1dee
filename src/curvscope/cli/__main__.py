"""``python -m curvscope.cli`` (what ``torchrun -m curvscope.cli probe ...`` runs)."""

import sys

from curvscope.cli.main import main

sys.exit(main())
