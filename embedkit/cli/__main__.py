"""``python -m embedkit.cli``: the same as the ``embedkit`` command."""
import sys

from . import main

sys.exit(main())
