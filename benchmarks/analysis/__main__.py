"""``python -m benchmarks.analysis``."""
import sys

from benchmarks.analysis.cli import main

sys.exit(main())
