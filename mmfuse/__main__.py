"""``python -m mmfuse``: the same as the ``mmfuse`` command."""

import sys

from ._cli import main

if __name__ == "__main__":  # importing this module (pydoc, autodoc) must not run the command
    sys.exit(main())
