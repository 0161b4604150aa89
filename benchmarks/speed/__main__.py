"""``python -m benchmarks.speed``."""
import sys

from benchmarks.speed.cli import main

sys.exit(main())
