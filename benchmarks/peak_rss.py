"""``python benchmarks/peak_rss.py`` or ``python -m benchmarks.peak_rss``: runs :mod:`benchmarks.checks.peak_rss`."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository instead of this folder on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.checks.peak_rss import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
