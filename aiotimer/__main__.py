"""``python -m aiotimer``: the same as the ``aiotimer`` command."""

import sys

from .cli import main

sys.exit(main())
