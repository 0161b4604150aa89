"""``python -m benchmarks.sequential`` (or ``python benchmarks/sequential`` from anywhere)."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a folder: the repository instead of this folder on the path
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from benchmarks.sequential.cli import main  # noqa: E402

sys.exit(main())
