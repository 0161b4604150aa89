"""What a speed run depends on: :class:`SpeedConfig`, the methods of each system, the issue's
targets, and the order in which the systems take turns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from benchmarks.common import DEFAULT_HPARAMS, METHODS, build_base_hparams, resolve_repo_path

SCHEMA_VERSION = 1
#: EasyEdit's algorithms this benchmark runs.
EE_METHODS = ("MEMIT", "AlphaEdit")
#: ours: the methods of :data:`benchmarks.common.METHODS` whose base method EasyEdit also runs
OUR_METHODS: dict[str, tuple[str, bool]] = {m: mode for m, mode in METHODS.items() if mode[0] in EE_METHODS}
SYSTEMS = ("ours", "easyedit")
DEFAULT_DATA = None  # None: the "counterfact" dataset of blue_plugin.datafiles, resolved when the run starts
#: The issue's targets, used for the "target" column of the table.
TARGETS = {
    "stats_ratio_max": 0.1,
    "batch_ratio_max": 0.5,
    "throughput_ratio_min": 0.7,
    "peak_rss_mib_max": 1536.0,
}


@dataclass
class SpeedConfig:
    """Everything a run depends on (picklable: it is sent to the worker processes).

    ``methods``: ours (names of :data:`OUR_METHODS`); ``ee_methods``: EasyEdit's (of
    :data:`EE_METHODS`), run only when ``easyedit_root`` is set. ``scaling``: batch sizes for the
    cost-growth sweep (one batch each) of ``scaling_methods`` (ours) and the EasyEdit method of the
    same base. ``stats_curve``: extra sample counts for the statistics-vs-samples curve.
    """

    model: str = "smollm2-135m"
    hparams: str = str(DEFAULT_HPARAMS)
    data: Optional[str] = DEFAULT_DATA
    n: int = 10
    batch_size: int = 10
    reps: int = 2
    methods: list = field(default_factory=lambda: list(OUR_METHODS))
    ee_methods: list = field(default_factory=lambda: list(EE_METHODS))
    easyedit_root: Optional[str] = None
    ee_python: Optional[str] = None
    mom2_n_samples: Optional[int] = None
    corpus: Optional[str] = None
    steps: Optional[int] = None
    overrides: dict = field(default_factory=dict)
    scaling: list = field(default_factory=list)
    scaling_methods: list = field(default_factory=lambda: ["MEMIT", "AlphaEdit_BLUE"])
    scaling_systems: list = field(default_factory=lambda: list(SYSTEMS))
    stats_curve: list = field(default_factory=list)
    stats_reps: int = 1
    threads: Optional[int] = None
    isolation: str = "process"
    plain_iters: int = 3
    plain_max_shapes: int = 8
    evaluate: bool = True
    restart_workers: bool = True
    seed: int = 0
    work_dir: Optional[str] = None  # set by run_speed: caches that outlive a worker process

    def validate(self) -> None:
        def pos(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")

        for name in ("n", "batch_size", "reps", "stats_reps", "plain_iters", "plain_max_shapes"):
            pos(name)
        pos("seed", 0)
        if self.threads is not None:
            pos("threads")
        unknown = [m for m in self.methods if m not in OUR_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {list(OUR_METHODS)}, got {self.methods!r}")
        bad = [m for m in self.ee_methods if m not in EE_METHODS]
        if bad:
            raise ValueError(f"ee_methods must be a subset of {list(EE_METHODS)}, got {self.ee_methods!r}")
        bad = [m for m in self.scaling_methods if m not in OUR_METHODS]
        if bad:
            raise ValueError(f"scaling_methods must be names of {list(OUR_METHODS)}, got {self.scaling_methods!r}")
        if not self.scaling_systems or any(s not in SYSTEMS for s in self.scaling_systems):
            raise ValueError(f"scaling_systems must be a non-empty subset of {list(SYSTEMS)}, "
                             f"got {self.scaling_systems!r}")
        for name in ("scaling", "stats_curve"):
            vals = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"{name} must list positive integers, got {vals!r}")
        if self.isolation not in ("process", "none"):
            raise ValueError(f"isolation must be 'process' or 'none', got {self.isolation!r}")
        if self.batch_size > self.n:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed n ({self.n})")

    @property
    def n_cases(self) -> int:
        """How many cases the run reads (the edits and the largest scaling batch)."""
        return max([self.n] + list(self.scaling))


def base_hparams(cfg: SpeedConfig, stats_dir: Optional[str]):
    """Our hyperparameters (YAML + the run's overrides), before ``base_method`` / ``blue``."""
    overrides = dict(cfg.overrides)
    if cfg.corpus is not None:
        overrides["mom2_dataset"] = resolve_repo_path(cfg.corpus)
    return build_base_hparams(cfg.hparams, cfg.batch_size, cfg.seed, cfg.mom2_n_samples, cfg.steps, stats_dir, overrides)


def ours_for_base(base: str, methods: Sequence[str]) -> list[str]:
    """Our methods of ``methods`` whose base method is ``base``."""
    return [m for m in methods if OUR_METHODS[m][0] == base]


def job_order(cfg: SpeedConfig, have_ee: bool) -> list[tuple[str, str]]:
    """(system, method) pairs of one repetition: per base method, EasyEdit's run sits between
    ours (e.g. ours MEMIT, EasyEdit MEMIT, ours MEMIT_BLUE), so the systems alternate."""
    jobs: list[tuple[str, str]] = []
    for base in EE_METHODS:
        group = [("ours", m) for m in ours_for_base(base, cfg.methods)]
        if have_ee and base in cfg.ee_methods:
            group.insert(min(1, len(group)), ("easyedit", base))
        jobs += group
    return jobs
