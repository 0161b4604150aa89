"""``python -m blue_plugin.stats`` (and the ``blue-plugin-stats`` script): precompute the key
statistics C_0 for the layers a configuration edits, in one process or under ``torchrun``."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
