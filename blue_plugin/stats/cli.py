"""Command line of the key statistics: ``python -m blue_plugin.stats`` (and the
``blue-plugin-stats`` script) precomputes C_0 for the layers a configuration edits, into the cache
the editing engine reads, in one process or sharded under ``torchrun``
(:mod:`blue_plugin.stats.distributed`); ``python -m blue_plugin.stats import FILE ...`` checks a
second-moment file of ROME / EasyEdit / AlphaEdit and imports it into that cache
(:mod:`blue_plugin.stats.importer`), or AlphaEdit's null-space projections
(:mod:`blue_plugin.stats.projection`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..errors import BLUEStatisticsError
from ..hparams import BLUEHyperParams
from ..model.layout import find_module, resolve_layout
from ..model.loading import default_cache_dir, load_model
from .accumulate import MOM2_DTYPES
from .cache import expected_d_in
from .distributed import distributed_second_moments
from .importer import DEFAULT_SYMMETRY_TOL, SOURCE_FORMATS, check_file, import_second_moment
from .projection import DEFAULT_PROJECTION_TOL, check_projection, import_projection
from .process_group import RankFailed, init_distributed
from .sources import SUBSETS, check_positive_int

logger = logging.getLogger(__name__)

_CLI_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers such as 4,8, got {text!r}") from None
    if not layers or any(x < 0 for x in layers):
        raise ValueError(f"--layers must list non-negative layer indices such as 4,8, got {text!r}")
    return sorted(dict.fromkeys(layers))


def _parse_ordered_layers(text: str) -> list[int]:
    """``--layers`` of ``import``: the order is kept (slice i of a projection file is layer i)."""
    layers = _parse_layers(text)
    given = [int(x) for x in text.replace(" ", "").split(",") if x]
    if len(given) != len(layers):
        raise ValueError(f"--layers lists a layer twice: {text!r}")
    return given


def build_arg_parser():
    """Arguments of ``python -m blue_plugin.stats``."""
    p = argparse.ArgumentParser(
        prog="python -m blue_plugin.stats",
        description=(
            "Precompute the key second moments C_0 that a BLUE config needs, into the cache the "
            "editing engine reads. Runs in one process, or sharded over processes and nodes under "
            "torchrun (e.g. `torchrun --nproc_per_node 2 -m blue_plugin.stats --hparams ...`). "
            "`python -m blue_plugin.stats import FILE ...` imports a ROME / EasyEdit / AlphaEdit "
            "layer_stats file instead (see `python -m blue_plugin.stats import --help`)."
        ),
    )
    p.add_argument("--hparams", required=True, help="BLUE YAML config (e.g. hparams/BLUE/smollm2-135m.yaml)")
    p.add_argument("--model", default=None, help="model name or local HF folder (default: the config's model_name)")
    p.add_argument("--layers", default=None,
                   help="comma-separated layers, e.g. 4,8 (default: the layers the config edits)")
    p.add_argument("--n-samples", type=int, default=None, help="corpus documents (default: mom2_n_samples)")
    p.add_argument("--corpus", default=None,
                   help="corpus: a text/.jsonl file, wikipedia, wikitext, wordnet, sampled or a combination such "
                        "as wordnet+sampled (default: mom2_dataset)")
    p.add_argument("--subset", choices=list(SUBSETS), default="random",
                   help="which documents: a seeded random subset (default) or the first ones")
    p.add_argument("--mom2-dtype", choices=sorted(MOM2_DTYPES), default=None,
                   help="dtype the keys are cast to before their products (default: mom2_dtype)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per document (default: mom2_max_length)")
    p.add_argument("--stats-dir", default=None,
                   help="cache folder (default: the config's stats_dir, else <cache>/stats as the engine uses)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per forward pass and process (default 16)")
    p.add_argument("--device", default=None, help="device of this process (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_CLI_DTYPES), default=None,
                   help="model dtype (default: the checkpoint's); sums are float64 regardless")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if valid cache files exist")
    p.add_argument("--report", default=None, help="write a JSON summary (timings per rank, files) here (rank 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m blue_plugin.stats``; returns the exit status.

    Under ``torchrun`` every process runs this; each takes its shard of the corpus, the sums are
    all-reduced and rank 0 writes the cache (see :mod:`blue_plugin.stats.distributed`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import"]:
        return import_main(argv[1:])
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING),
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    info = None
    try:
        if args.threads is not None:
            torch.set_num_threads(check_positive_int(args.threads, "--threads"))
        hp = BLUEHyperParams.from_hparams(args.hparams)
        changes: dict[str, object] = {}
        if args.model is not None:
            changes["model_name"] = args.model
        if args.n_samples is not None:
            changes["mom2_n_samples"] = args.n_samples
        if args.corpus is not None:
            changes["mom2_dataset"] = args.corpus
        if args.max_length is not None:
            changes["mom2_max_length"] = args.max_length
        if args.mom2_dtype is not None:
            changes["mom2_dtype"] = args.mom2_dtype
        layers = _parse_layers(args.layers) if args.layers is not None else list(hp.edit_layers)
        changes["layers"] = layers
        hp = hp.replace(**changes)
        if not hp.mom2_adjustment:
            logger.warning("%s has mom2_adjustment: false; the engine will not use these statistics", args.hparams)
        check_positive_int(args.batch_size, "--batch-size")

        info = init_distributed(args.device)
        model, tok = load_model(hp.model_name, device=info.device,
                                dtype=_CLI_DTYPES[args.dtype] if args.dtype else None)
        layout = resolve_layout(model, hp)
        names = [layout.rewrite(layer) for layer in layers]
        # Same cache folder and model id as Editor.ensure_second_moments, so the engine finds the files.
        cache_dir = args.stats_dir or (hp.stats_dir if hp.stats_dir is not None else default_cache_dir() / "stats")
        model_id = str(getattr(model.config, "_name_or_path", None) or hp.model_name)
        run = distributed_second_moments(
            model, tok, names, corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples,
            max_length=hp.mom2_max_length, cache_dir=cache_dir, model_id=model_id,
            batch_size=args.batch_size, progress=not args.no_progress, overwrite=args.overwrite,
            mom2_dtype=hp.mom2_dtype, subset=args.subset,
        )
        if info.is_main:
            tokens = sum(r["tokens"] for r in run.ranks)
            slowest = max((r["seconds"] for r in run.ranks), default=0.0)
            logger.info("%d module(s) computed, %d found in the cache", len(run.computed), len(run.cached))
            if run.computed:
                logger.info(
                    "%d tokens on %d process(es); accumulation %.1fs (slowest rank), %.0f tokens/s in total",
                    tokens, info.world_size, slowest, tokens / slowest if slowest else float("nan"),
                )
            for n in names:
                logger.info("%s -> %s", n, run.paths[n])
            if args.report:
                report = {
                    "model": hp.model_name, "model_id": model_id, "modules": names,
                    "corpus": hp.mom2_dataset, "n_samples": hp.mom2_n_samples, "max_length": hp.mom2_max_length,
                    "subset": args.subset, "mom2_dtype": hp.mom2_dtype,
                    "batch_size": args.batch_size, "world_size": info.world_size, "backend": info.backend,
                    "device": str(info.device), "threads": torch.get_num_threads(),
                    "computed": run.computed, "cached": run.cached, "count": run.count,
                    "ranks": run.ranks, "seconds_total": run.seconds,
                    "paths": {n: str(p) if p is not None else None for n, p in run.paths.items()},
                }
                Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return 0
    except ValueError as e:  # user-fixable (config, corpus, layers, ...)
        logger.error("%s", e)
        return 2
    except RankFailed as e:  # the rank that failed has logged why
        logger.error("%s", e)
        return 1
    finally:
        if info is not None and info.backend is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def build_import_parser():
    """Arguments of ``python -m blue_plugin.stats import``."""
    p = argparse.ArgumentParser(
        prog="python -m blue_plugin.stats import",
        description=(
            "Check a second-moment file written by ROME's / EasyEdit's / AlphaEdit's layer_stats (.npz, or the "
            "same state as a torch.save .pt) -- format, no pickles, sample count, shape against the module, "
            "finiteness, symmetry -- and store its mean in the cache the editing engine reads, as the statistics "
            "of the config's mom2_dataset / mom2_n_samples / mom2_max_length / mom2_dtype. AlphaEdit's "
            "null_space_project.pt (a tensor (L, d, d) of null-space projections; --layers maps its slices to layers "
            "in order) is checked -- shape, finiteness, symmetry, P P = P, eigenvalues 0 or 1 -- and stored as "
            "projections that AlphaEdit edits with, without C0. A refused file writes nothing."
        ),
    )
    p.add_argument("source", help="the file to import (.npz/.npy: numpy; .pt/.pth/.bin: torch)")
    p.add_argument("--hparams", default=None,
                   help="BLUE YAML config whose model and statistics settings the file will serve (needed to write)")
    p.add_argument("--model", default=None, help="model name or local HF folder (default: the config's model_name)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--layer", type=int, default=None, help="layer the file belongs to (its rewrite module)")
    where.add_argument("--module", default=None, help="module name instead, e.g. model.layers.4.mlp.down_proj")
    where.add_argument("--layers", default=None,
                       help="layers of a projection file's slices, in order, e.g. 4,5,6,7,8 (AlphaEdit's layers)")
    p.add_argument("--d-in", type=int, default=None,
                   help="key dimension to check against; without --hparams the file is only checked")
    p.add_argument("--format", choices=[*SOURCE_FORMATS, "projection"], default=None,
                   help="source format (default: by suffix; a .pt holding projections, or --layers, means projection)")
    p.add_argument("--nullspace-threshold", type=float, default=None,
                   help="threshold the projections were computed with (default: the config's nullspace_threshold)")
    p.add_argument("--projection-tol", type=float, default=DEFAULT_PROJECTION_TOL,
                   help=f"tolerance of the symmetry, idempotency and eigenvalue checks of a projection "
                        f"(default {DEFAULT_PROJECTION_TOL:g})")
    p.add_argument("--corpus", default=None, help="corpus the file stands for (default: mom2_dataset)")
    p.add_argument("--n-samples", type=int, default=None, help="documents it stands for (default: mom2_n_samples)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per document (default: mom2_max_length)")
    p.add_argument("--mom2-dtype", choices=sorted(MOM2_DTYPES), default=None, help="(default: mom2_dtype)")
    p.add_argument("--subset", choices=list(SUBSETS), default="random", help="document subset it stands for")
    p.add_argument("--stats-dir", default=None,
                   help="cache folder (default: the config's stats_dir, else <cache>/stats as the engine uses)")
    p.add_argument("--symmetry-tol", type=float, default=DEFAULT_SYMMETRY_TOL,
                   help=f"allowed max |C - C^T| relative to max |C| (default {DEFAULT_SYMMETRY_TOL:g})")
    p.add_argument("--dtype", choices=sorted(_CLI_DTYPES), default=None,
                   help="model dtype (default: the checkpoint's); bfloat16 halves the memory of a float32 "
                        "checkpoint and gives the same cache file")
    p.add_argument("--check-only", action="store_true", help="run every check against the model, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a local corpus is read to fingerprint it)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def import_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m blue_plugin.stats import``; 0 on success, 2 for a refused file or
    a configuration problem (the message names the failed check or what to fix)."""
    args = build_import_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        d_in = check_positive_int(args.d_in, "--d-in") if args.d_in is not None else None
        layers = _parse_ordered_layers(args.layers) if args.layers is not None else None
        projection = args.format == "projection" or layers is not None or args.nullspace_threshold is not None
        if args.hparams is None:
            if d_in is None:
                raise ValueError("give --hparams with --layer, --layers or --module to import into the cache, "
                                 "or --d-in to only check the file")
            return _check_only(args, d_in, None if layers is None else len(layers), projection)
        if args.layer is None and args.module is None and layers is None:
            raise ValueError("give --layer N, --layers N1,N2,... or --module NAME: the module(s) whose keys the "
                             "file describes")
        hp = BLUEHyperParams.from_hparams(args.hparams)
        changes = {k: v for k, v in {
            "model_name": args.model, "mom2_dataset": args.corpus, "mom2_n_samples": args.n_samples,
            "mom2_max_length": args.max_length, "mom2_dtype": args.mom2_dtype}.items() if v is not None}
        hp = hp.replace(**changes) if changes else hp
        model, tok = load_model(hp.model_name, dtype=_CLI_DTYPES[args.dtype] if args.dtype else None)
        layout = resolve_layout(model, hp)
        if layers is not None:
            names = [layout.rewrite(layer) for layer in layers]
        else:
            names = [args.module if args.module is not None else layout.rewrite(args.layer)]
        actual = expected_d_in(find_module(model, names[0]))
        if d_in is not None and actual is not None and d_in != actual:
            raise ValueError(f"--d-in {d_in} disagrees with the key dimension {actual} of {names[0]}")
        if args.check_only:
            return _check_only(args, actual if actual is not None else d_in, len(names), projection, names)
        cache_dir = args.stats_dir or (hp.stats_dir if hp.stats_dir is not None else default_cache_dir() / "stats")
        settings = dict(corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples, max_length=hp.mom2_max_length,
                        cache_dir=cache_dir, model_id=str(getattr(model.config, "_name_or_path", None) or hp.model_name),
                        mom2_dtype=hp.mom2_dtype, subset=args.subset, overwrite=args.overwrite,
                        progress=not args.no_progress)
        if not projection:
            try:
                result = import_second_moment(args.source, model, tok, names[0], source_format=args.format,
                                              symmetry_tol=args.symmetry_tol, **settings)
                logger.info("%s -> %s (%d tokens)", names[0], result.path, result.count)
                return 0
            except BLUEStatisticsError as e:
                if e.check != "projection":
                    raise
                logger.info("%s holds null-space projections: importing them as AlphaEdit's projections", args.source)
        threshold = args.nullspace_threshold if args.nullspace_threshold is not None else hp.nullspace_threshold
        results = import_projection(args.source, model, tok, names, threshold=threshold, tol=args.projection_tol,
                                    **settings)
        for r in results:
            logger.info("%s -> %s (projection of rank %d, threshold %g)", r.module, r.path, r.count, threshold)
        return 0
    except ValueError as e:  # refused files (BLUEStatisticsError) and user-fixable settings
        logger.error("%s", e)
        return 2


def _check_only(args, d_in: int | None, n_layers: int | None, projection: bool, names: Sequence[str] = ()) -> int:
    """Every check of ``args.source`` (as a second moment, or as projections when ``projection``
    or when the file turns out to hold them), nothing written."""
    where = f" for {', '.join(names)}" if names else ""
    if not projection:
        try:
            src, _, asym = check_file(args.source, d_in, args.format, args.symmetry_tol)
            logger.info("%s passes every check%s (%s, %d tokens, %d x %d, max asymmetry %.3g); nothing written%s",
                        src.path, where, src.source_format, src.count, d_in, d_in, asym,
                        "" if names else ": give --hparams and --layer to import it")
            return 0
        except BLUEStatisticsError as e:
            if e.check != "projection":
                raise
    proj = check_projection(args.source, d_in, n_layers, args.projection_tol)
    logger.info("%s passes every check%s as %d null-space projection(s) of d = %d (ranks %s); nothing written%s",
                proj.path, where, len(proj.slices), proj.tensor.shape[-1], [c.rank for c in proj.slices],
                "" if names else ": give --hparams and --layers to import it")
    return 0
