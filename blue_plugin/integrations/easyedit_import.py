"""Importing EasyEdit: locating the checkout and importing ``easyeditor`` on a CPU machine.

EasyEdit (zjunlp/EasyEdit) is used as a git checkout whose ``easyeditor`` package is put on
``sys.path`` (``root=...`` or ``$EASYEDIT_ROOT``). This module imports nothing of blue_plugin;
:mod:`blue_plugin.integrations.easyedit` registers BLUE once EasyEdit is imported.

Importing ``easyeditor`` imports all of EasyEdit, multimodal parts included. On a CPU machine
with a current transformers two things cannot be installed from the package index:
``torchvision`` (its index wheel is a CUDA build that breaks transformers' ``AutoProcessor``
next to a CPU torch; ``timm`` needs it) and ``transformers.modeling_attn_mask_utils`` (removed
from transformers after the 5.5 release that EasyEdit pins; only UnKE uses it).
:func:`import_easyeditor` serves inert placeholders for exactly these modules, only while
``easyeditor`` is being imported, only to importers inside ``easyeditor``, and only when the real
module is missing. A placeholder raises :class:`ImportError` when anything from it is called, and
is removed from ``sys.modules`` afterwards, so no other library ever sees it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = [
    "EASYEDIT_ROOT_ENV",
    "available_root",
    "easyedit_hyperparams_base",
    "easyedit_root",
    "import_easyeditor",
    "last_placeholders",
]

#: Environment variable pointing at an EasyEdit checkout (the folder that contains ``easyeditor/``).
EASYEDIT_ROOT_ENV = "EASYEDIT_ROOT"
#: Modules that may be served as placeholders during ``import easyeditor`` (see module docstring).
_SHIMMABLE = ("torchvision", "timm", "transformers.modeling_attn_mask_utils")
_SHIM_HINT = (
    "this is a placeholder that blue_plugin served while importing EasyEdit, because the module is "
    "not installed; it is only needed by EasyEdit's multimodal / UnKE code. Install it (torchvision "
    "and timm: a torchvision build matching your torch; modeling_attn_mask_utils: transformers==5.5.4) "
    "to use that part of EasyEdit."
)

# What the last successful import_easyeditor() served as placeholders (see last_placeholders()).
_last_placeholders: list[str] = []


def last_placeholders() -> list[str]:
    """The modules the last successful :func:`import_easyeditor` served as placeholders."""
    return list(_last_placeholders)


def easyedit_root(root: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The EasyEdit checkout to use: ``root`` if given, else ``$EASYEDIT_ROOT``, else ``None``.

    Raises :class:`ValueError` when the folder given does not contain ``easyeditor/__init__.py``.
    """
    source = "root argument"
    if root is None:
        env = os.environ.get(EASYEDIT_ROOT_ENV, "").strip()
        if not env:
            return None
        root, source = env, f"${EASYEDIT_ROOT_ENV}"
    path = Path(root).expanduser().resolve()
    if not (path / "easyeditor" / "__init__.py").is_file():
        raise ValueError(
            f"{source} = {str(root)!r} is not an EasyEdit checkout: {path / 'easyeditor' / '__init__.py'} "
            "does not exist. Point it at the folder that contains 'easyeditor/' "
            "(git clone https://github.com/zjunlp/EasyEdit)."
        )
    return path


class _Placeholder:
    """Stands for any object imported from a missing module; calling it raises ImportError."""

    def __init__(self, qualname: str) -> None:
        self._qualname = qualname

    def __getattr__(self, name: str) -> "_Placeholder":
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._qualname}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{self._qualname}: {_SHIM_HINT}")

    def __repr__(self) -> str:
        return f"<blue_plugin placeholder {self._qualname}>"


class _PlaceholderModule(types.ModuleType):
    """A module whose every attribute is a :class:`_Placeholder`."""

    __blue_plugin_placeholder__ = True

    def __getattr__(self, name: str) -> _Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")


def _importer_module() -> str:
    """``__name__`` of the module whose import statement is being resolved (skips importlib)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (frame.f_code.co_filename.startswith("<frozen") or name == "importlib" or name.startswith("importlib.")):
            return name
        frame = frame.f_back
    return ""


class _CompatFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last-resort finder: serves placeholders for :data:`_SHIMMABLE` modules to easyeditor only.

    It is appended to the end of ``sys.meta_path``, so the import system asks it only after every
    real finder failed, i.e. only for modules that are really missing.
    """

    def __init__(self) -> None:
        self.served: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if not any(fullname == m or fullname.startswith(m + ".") for m in _SHIMMABLE):
            return None
        importer = _importer_module()
        if not (importer == "easyeditor" or importer.startswith("easyeditor.")):
            return None  # e.g. transformers probing whether torchvision is installed
        parent = fullname.rpartition(".")[0]
        if parent and fullname not in _SHIMMABLE:
            # a submodule: only below a placeholder package, never inside a real one
            if not getattr(sys.modules.get(parent), "__blue_plugin_placeholder__", False):
                return None
        self.served.append(fullname)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module) -> None:
        module.__path__ = []  # a package, so that its submodules come here as well


def _drop_modules(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def import_easyeditor(root: Optional[str | os.PathLike] = None, *, compat: bool = True) -> types.ModuleType:
    """Import and return the ``easyeditor`` package.

    ``root`` (or ``$EASYEDIT_ROOT``) is the EasyEdit checkout; it is put first on ``sys.path``.
    Without either, ``easyeditor`` must already be importable. With ``compat=True`` the
    placeholders described in the module docstring are served for missing modules during the
    import (and removed again afterwards). Raises :class:`ImportError` saying which package to
    install when EasyEdit cannot be imported.
    """
    if "easyeditor" in sys.modules and getattr(sys.modules["easyeditor"], "BaseEditor", None) is not None:
        return sys.modules["easyeditor"]
    path = easyedit_root(root)
    if path is not None and str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if importlib.util.find_spec("easyeditor") is None:
        raise ImportError(
            "easyeditor is not importable: clone https://github.com/zjunlp/EasyEdit and pass its folder "
            f"as root=... or set {EASYEDIT_ROOT_ENV}=/path/to/EasyEdit."
        )
    finder = _CompatFinder() if compat else None
    if finder is not None:
        sys.meta_path.append(finder)
    try:
        module = importlib.import_module("easyeditor")
    except Exception as exc:
        _drop_modules("easyeditor")  # a later retry starts clean
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        hint = (
            f"install the missing package ({missing!r}; see docs/easyedit.md for the full list)"
            if missing
            else "see docs/easyedit.md (a torchvision installed for CUDA next to a CPU torch breaks "
            "transformers' AutoProcessor: uninstall torchvision and timm, or install matching builds)"
        )
        raise ImportError(f"importing EasyEdit failed: {type(exc).__name__}: {exc}; {hint}") from exc
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
            for name in finder.served:
                mod = sys.modules.get(name)
                if getattr(mod, "__blue_plugin_placeholder__", False):
                    del sys.modules[name]
    _last_placeholders[:] = finder.served if finder is not None else []
    if _last_placeholders:
        logger.info("EasyEdit imported with placeholders for missing optional modules: %s", ", ".join(_last_placeholders))
    return module


def available_root() -> tuple[bool, Optional[Path]]:
    """Whether EasyEdit looks available (without importing it), and the checkout to use.

    EasyEdit counts as available when ``easyeditor`` is already imported, is on ``sys.path``, or
    ``$EASYEDIT_ROOT`` names a checkout; ``BLUE_PLUGIN_NO_EASYEDIT=1`` makes it unavailable.
    """
    if os.environ.get("BLUE_PLUGIN_NO_EASYEDIT", "").strip() not in ("", "0"):
        return False, None
    try:
        root = easyedit_root()
    except ValueError as exc:
        logger.warning("ignoring EasyEdit: %s", exc)
        return False, None
    if root is None and "easyeditor" not in sys.modules:
        try:
            if importlib.util.find_spec("easyeditor") is None:
                return False, None
        except (ImportError, ValueError):
            return False, None
    return True, root


def easyedit_hyperparams_base() -> Optional[type]:
    """EasyEdit's ``HyperParams`` class when EasyEdit is available (same rules as
    :func:`available_root`; imported with :func:`import_easyeditor`), else ``None``. Meant for
    choosing the base class of :class:`~blue_plugin.hparams.BLUEHyperParams`."""
    available, root = available_root()
    if not available:
        return None
    try:
        import_easyeditor(root)
        from easyeditor.util.hparams import HyperParams  # type: ignore
    except (ImportError, ValueError) as exc:
        logger.warning("EasyEdit found but not importable: %s", exc)
        return None
    return HyperParams
