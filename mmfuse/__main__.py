"""``python -m mmfuse``: the same as the ``mmfuse`` command."""

import sys

from ._cli import main

sys.exit(main())
