"""``python benchmarks/stats_throughput.py`` or ``python -m benchmarks.stats_throughput``: runs :mod:`benchmarks.checks.stats_throughput`."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository instead of this folder on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.checks.stats_throughput import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
