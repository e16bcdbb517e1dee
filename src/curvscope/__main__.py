"""``python -m curvscope`` runs the command line, as the ``curvscope`` script does."""

import sys

from curvscope.cli.main import main

sys.exit(main())
