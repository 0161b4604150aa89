"""Where the datasets come from: one resolver behind every default data path.

A dataset is asked for by registry name (:data:`DATASETS`: ``counterfact``, ``zsre``,
``wordnet-glosses``) or by path. :func:`resolve_data` tries, in order:

1. an explicit path (``path=``, or a ``name_or_path`` that is an existing file); an explicit
   ``path=`` that does not exist is an error and nothing else is tried;
2. ``$BLUE_PLUGIN_DATA/<relative path>`` (several folders may be joined with ``os.pathsep``);
3. the cache ``<cache>/data/<relative path>``; ``<cache>`` is ``$BLUE_PLUGIN_CACHE``, else
   ``$XDG_CACHE_HOME/blue_plugin``, else ``~/.cache/blue_plugin`` (as
   :func:`blue_plugin.model.loading.default_cache_dir`);
4. a download from the dataset's public address into the cache (registry names only);
5. :class:`DataFileNotFound`, naming every place tried and the command that fetches the file.

Relative paths follow one layout (``counterfact/counterfact-edit.json``,
``zsre/zsre_mend_eval_portability_gpt4.json``, ``corpus/wordnet-glosses.txt``). Addresses can be
overridden per dataset with ``$BLUE_PLUGIN_DATA_URL_<NAME>`` (upper case, ``-`` as ``_``) or for
all with ``$BLUE_PLUGIN_DATA_BASE_URL`` (``<base>/<relative path>``). A download goes to a temporary
file beside its destination, is checked (complete, size, JSON shape) and only then renamed into
place; a failed one leaves nothing behind.

CLI: ``python -m blue_plugin.datafiles fetch counterfact`` (``zsre``, ``all``), ``... where``, ``... list``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger("blue_plugin.datafiles")  # the same name when run with -m

DATA_ENV = "BLUE_PLUGIN_DATA"
CACHE_ENV = "BLUE_PLUGIN_CACHE"
URL_ENV_PREFIX = "BLUE_PLUGIN_DATA_URL_"
BASE_URL_ENV = "BLUE_PLUGIN_DATA_BASE_URL"
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 16


class DataFileError(ValueError):
    """A dataset could not be found, downloaded or validated."""


class DataFileNotFound(DataFileError, FileNotFoundError):
    """No place holds the requested dataset; the message names every place tried."""


class DataDownloadError(DataFileError):
    """A download failed (HTTP error, unreachable, truncated, not the expected file)."""


@dataclass(frozen=True)
class DataSpec:
    """One known dataset.

    ``relpath``: where it lives under ``$BLUE_PLUGIN_DATA`` and the cache. ``url``: its public
    address (None: no download). ``min_bytes``: a smaller download is refused. ``kind``:
    ``"json"`` (a list of records, each a dict holding ``required_keys``) or ``"text"``.
    ``how_to_get``: what to do when there is no ``url``.
    """

    name: str
    relpath: str
    description: str
    url: Optional[str]
    min_bytes: int
    kind: str = "json"
    required_keys: tuple[str, ...] = ()
    how_to_get: str = ""


# EasyEdit ships these files only inside a zip on Google Drive (zjunlp/EasyEdit README.md and
# examples/README.md: drive.google.com/file/d/1WRo2SqqgNtZF11Vq0sF5nL_-bHi18Wi4, editing-data/),
# which cannot be fetched as one file. The addresses below are public GitHub copies of the same
# files, pinned to a commit; their git blob ids equal those of the files this project was developed
# with (counterfact-edit.json 70b5ebce..., zsre_mend_eval_portability_gpt4.json 4add5752...).
_GH = "https://raw.githubusercontent.com/"
DATASETS: dict[str, DataSpec] = {s.name: s for s in (
    DataSpec(
        "counterfact", "counterfact/counterfact-edit.json",
        "EasyEdit's CounterFact edit split (10,000 records, ~3.9 MB)",
        # github.com/Jometeorie/KnowledgeSpread, data/counterfact/counterfact-edit.json
        _GH + "Jometeorie/KnowledgeSpread/51d7402617c2e52bde0dc11b76e400c3725a181a/data/counterfact/counterfact-edit.json",
        min_bytes=3_000_000,
        required_keys=("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                       "locality_ground_truth")),
    DataSpec(
        "zsre", "zsre/zsre_mend_eval_portability_gpt4.json",
        "MEND/EasyEdit zsRE eval split with portability (1,037 records, ~0.8 MB)",
        # github.com/JasonForJoy/Model-Editing-Hurt, edited-data/ (deleted from its head later; the commit keeps it)
        _GH + "JasonForJoy/Model-Editing-Hurt/82614b0414cfe6284ba0b136174f00716a4fe531/edited-data/"
        "zsre_mend_eval_portability_gpt4.json",
        min_bytes=600_000, required_keys=("subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans")),
    DataSpec(
        "wordnet-glosses", "corpus/wordnet-glosses.txt",
        "WordNet 3.0 glosses, one per line (corpus for the key statistics)", None, min_bytes=1_000_000, kind="text",
        how_to_get="build it from Debian's wordnet-base package: the text after '| ' in data.noun, data.verb, "
        "data.adj and data.adv, one gloss per line"),
)}


def fetch_command(name: str) -> str:
    """The one command that downloads dataset ``name`` into the cache."""
    return f"python -m blue_plugin.datafiles fetch {name}"


def get_spec(name: str) -> Optional[DataSpec]:
    """The registry entry for a name (case-insensitive, ``_`` = ``-``) or a relative path; else None."""
    key = str(name).strip().lower().replace("_", "-")
    for spec in DATASETS.values():
        if key == spec.name or str(name).strip().replace(os.sep, "/") == spec.relpath:
            return spec
    return None


def _spec(name: str) -> DataSpec:
    spec = get_spec(name)
    if spec is None:
        raise DataFileError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return spec


def cache_dir() -> Path:
    """The data cache, ``<blue_plugin cache>/data`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "blue_plugin"
    return root / "data"


def data_dirs() -> list[Path]:
    """The folders named by ``$BLUE_PLUGIN_DATA`` (``os.pathsep``-separated), in order."""
    return [Path(p).expanduser() for p in os.environ.get(DATA_ENV, "").split(os.pathsep) if p.strip()]


def dataset_url(name: str, url: Optional[str] = None) -> Optional[str]:
    """The download address: ``url`` if given, else ``$BLUE_PLUGIN_DATA_URL_<NAME>``, else
    ``$BLUE_PLUGIN_DATA_BASE_URL/<relative path>``, else the registry's (None: no download)."""
    spec = _spec(name)
    if url:
        return url
    env = os.environ.get(URL_ENV_PREFIX + spec.name.upper().replace("-", "_"), "").strip()
    if env:
        return env
    base = os.environ.get(BASE_URL_ENV, "").strip()
    if base:
        return base.rstrip("/") + "/" + spec.relpath
    return spec.url


def locate(name_or_path: str | os.PathLike) -> Optional[Path]:
    """Where a dataset is now, without downloading or raising; None if nowhere."""
    try:
        return resolve_data(name_or_path, download=False)
    except DataFileError:
        return None


def resolve_data(name_or_path: str | os.PathLike, path: str | os.PathLike | None = None, download: bool = True,
                 url: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """The absolute path of a dataset file, found (or downloaded) in the order of the module docstring.

    Args:
        name_or_path: a registry name (``counterfact``, ``zsre``, ``wordnet-glosses``), a registry
            relative path, or a file path. A relative path that is not a file from the current
            directory is looked for under ``$BLUE_PLUGIN_DATA`` and the cache (never downloaded).
        path: an explicit file; when given it is returned if it exists, else an error is raised.
        download: allow step 4 (registry names only).
        url: download address overriding the environment and the registry.
        timeout: seconds for the download's connection and each read.

    Raises:
        DataFileNotFound: nowhere to be found (a ValueError and a FileNotFoundError).
    """
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p.absolute()
        raise DataFileNotFound(f"data file {str(p)!r} (given for {str(name_or_path)!r}) does not exist; "
                               "pass the path of an existing file")
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p.absolute()
    spec = get_spec(str(name_or_path))
    if spec is None and p.is_absolute():
        raise DataFileNotFound(f"data file {str(p)!r} does not exist, and {str(name_or_path)!r} is not a "
                               f"known dataset name ({', '.join(DATASETS)})")
    rel = spec.relpath if spec else str(p)
    tried = [] if spec else [f"{p.absolute()}: no such file"]
    places = [(f"${DATA_ENV}", d / rel) for d in data_dirs()]
    if not places:
        tried.append(f"${DATA_ENV}: not set")
    for label, candidate in places + [("cache", cache_dir() / rel)]:
        if candidate.is_file():
            logger.debug("%s: using %s (%s)", name_or_path, candidate, label)
            return candidate.absolute()
        tried.append(f"{label}: {candidate} (no such file)")
    if spec is not None:
        address = dataset_url(spec.name, url)
        if address is None:
            tried.append(f"download: {spec.name} has no public address ({spec.how_to_get})")
        elif not download:
            tried.append(f"download from {address}: not attempted (download disabled)")
        else:
            try:
                return download_dataset(spec.name, url=address, timeout=timeout)
            except DataDownloadError as exc:
                tried.append(f"download: {exc}")
    lines = "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
    what = f"dataset {spec.name!r} ({spec.relpath})" if spec else f"data file {rel!r}"
    if spec is not None and dataset_url(spec.name, url):
        fix = f"Fetch it with:  {fetch_command(spec.name)}\nor set"
    else:
        fix = "Set"
    raise DataFileNotFound(
        f"{what} not found. Tried:\n{lines}\n{fix} ${DATA_ENV} to a folder holding {rel}, "
        "or pass the file's path."
    )


def validate_file(name: str, file: str | os.PathLike) -> None:
    """Check that ``file`` looks like dataset ``name`` (size, then JSON shape or UTF-8 text).

    Raises:
        DataDownloadError: what is wrong with it.
    """
    spec = _spec(name)
    size = os.path.getsize(file)
    if size < spec.min_bytes:
        raise DataDownloadError(f"{size} bytes, expected at least {spec.min_bytes} for {spec.name}: "
                                "truncated, or not the dataset")
    if spec.kind == "text":
        try:
            with open(file, encoding="utf-8") as fh:
                for _ in fh:
                    pass
        except UnicodeDecodeError as exc:
            raise DataDownloadError(f"not UTF-8 text ({exc})") from exc
        return
    try:
        with open(file, encoding="utf-8") as fh:
            records = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataDownloadError(f"not valid JSON ({exc}): truncated, or not the dataset") from exc
    if not isinstance(records, list) or not records:
        got = "an empty list" if isinstance(records, list) else f"a JSON {type(records).__name__}"
        raise DataDownloadError(f"expected a non-empty JSON list of records, got {got}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataDownloadError(f"record {i} is a {type(record).__name__}, expected an object")
        missing = [k for k in spec.required_keys if k not in record]
        if missing:
            raise DataDownloadError(f"record {i} lacks {missing}; a {spec.name} record needs "
                                    f"{list(spec.required_keys)}")


def download_dataset(name: str, dest: str | os.PathLike | None = None, url: Optional[str] = None,
                     timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Download dataset ``name`` to ``dest`` (default: its place in the cache), atomically.

    The bytes go to a temporary file in ``dest``'s folder, which is checked (complete transfer,
    :func:`validate_file`) and then renamed onto ``dest``; on any failure it is deleted.

    Raises:
        DataDownloadError: no address, HTTP error, unreachable, timeout, truncated, wrong content.
    """
    spec = _spec(name)
    address = dataset_url(spec.name, url)
    if address is None:
        raise DataDownloadError(f"{spec.name} has no public download address; {spec.how_to_get}")
    target = Path(dest).expanduser() if dest is not None else cache_dir() / spec.relpath
    logger.info("downloading %s from %s to %s", spec.name, address, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise DataDownloadError(f"cannot write into {target.parent} ({exc}); set ${CACHE_ENV} to a "
                                "writable folder") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                request = urllib.request.Request(address, headers={"User-Agent": "blue_plugin-datafiles"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    got = 0
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        got += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if length is not None and length.isdigit() and got != int(length):
                raise DataDownloadError(f"got {got} of {length} bytes (truncated transfer)")
            validate_file(spec.name, tmp)
        except urllib.error.HTTPError as exc:
            raise DataDownloadError(f"{address}: HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            raise DataDownloadError(f"{address}: cannot be reached ({exc.reason})") from exc
        except (http.client.HTTPException, OSError) as exc:  # OSError includes TimeoutError
            raise DataDownloadError(f"{address}: transfer failed ({type(exc).__name__}: {exc})") from exc
        except DataDownloadError as exc:
            raise DataDownloadError(f"{address}: {exc}") from exc
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    logger.info("%s: %d bytes written to %s", spec.name, target.stat().st_size, target)
    return target


def fetch(name: str, force: bool = False, url: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Put dataset ``name`` into the cache (download unless it is there already, or ``force``)."""
    spec = _spec(name)
    target = cache_dir() / spec.relpath
    if target.is_file() and not force:
        logger.info("%s is already in the cache: %s", spec.name, target)
        return target
    return download_dataset(spec.name, dest=target, url=url, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blue_plugin.datafiles",
                                description="Find and download blue_plugin's datasets.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download datasets into the cache")
    f.add_argument("names", nargs="+", help=f"dataset names ({', '.join(DATASETS)}) or 'all'")
    f.add_argument("--url", default=None, help="download address (one dataset only)")
    f.add_argument("--force", action="store_true", help="download again even if cached")
    f.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds (default %(default)s)")
    w = sub.add_parser("where", help="where each dataset resolves now (no download)")
    w.add_argument("names", nargs="*", help="dataset names (default: all)")
    sub.add_parser("list", help="the known datasets, their relative paths and addresses")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m blue_plugin.datafiles``; returns the exit status."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    out = sys.stdout
    try:
        if args.command == "list":
            out.write(f"cache: {cache_dir()}\n${DATA_ENV}: {os.environ.get(DATA_ENV) or '(not set)'}\n")
            for spec in DATASETS.values():
                out.write(f"{spec.name}\t{spec.relpath}\t{dataset_url(spec.name) or '(no download)'}\t"
                          f"{spec.description}\n")
            return 0
        if args.command == "where":
            names = args.names or list(DATASETS)
            missing = 0
            for name in names:
                spec = _spec(name)
                found = locate(spec.name)
                missing += found is None
                hint = fetch_command(spec.name) if dataset_url(spec.name) else f"set ${DATA_ENV}"
                out.write(f"{spec.name}\t{found or 'not found (' + hint + ')'}\n")
            return 1 if (missing and args.names) else 0
        names = list(DATASETS) if args.names == ["all"] else args.names
        if args.url and len(names) != 1:
            raise DataFileError("--url applies to one dataset; name exactly one")
        failed = 0
        for name in names:
            spec = _spec(name)
            if args.names == ["all"] and dataset_url(spec.name) is None:
                logger.info("skipping %s: no download address (%s)", spec.name, spec.how_to_get)
                continue
            try:
                out.write(f"{spec.name}\t{fetch(spec.name, force=args.force, url=args.url, timeout=args.timeout)}\n")
            except DataFileError as exc:
                logger.error("%s: %s", spec.name, exc)
                failed += 1
        return 1 if failed else 0
    except DataFileError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
