"""``python -m benchmarks.speed_combine``: :mod:`benchmarks.speed.combine` (merging split cost-growth sweeps)."""
import sys

from benchmarks.speed.combine import combine, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
