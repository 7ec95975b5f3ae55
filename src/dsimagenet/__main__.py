"""``python -m dsimagenet`` is the ``dsimagenet`` command (and what ``torchrun -m dsimagenet`` runs)."""

import sys

from dsimagenet.cli import main

sys.exit(main())
