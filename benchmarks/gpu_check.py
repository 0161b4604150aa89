"""``python benchmarks/gpu_check.py`` or ``python -m benchmarks.gpu_check``: runs :mod:`benchmarks.checks.gpu_check`."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository instead of this folder on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.checks.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
