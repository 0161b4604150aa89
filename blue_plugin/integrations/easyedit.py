"""EasyEdit integration: make ``BaseEditor`` run BLUE.

EasyEdit dispatches on ``hparams.alg_name`` through ``ALG_DICT`` and, in a few places, on
hard-coded lists of algorithm names. :func:`register_with_easyedit` imports EasyEdit (see
:mod:`blue_plugin.integrations.easyedit_import`, whose names are re-exported here) and makes
``"BLUE"`` behave exactly as ``"MEMIT"`` / ``"AlphaEdit"`` in all of them:

* ``easyeditor.util.alg_dict.ALG_DICT["BLUE"]`` -> :func:`apply_blue_easyedit` (a thin adapter
  around :func:`blue_plugin.editing.editor.apply_blue_to_model`);
* ``BatchEditor.is_batchable_method`` (an ``Enum`` staticmethod with a hard-coded chain of names)
  is wrapped so that it also answers ``True`` for ``"BLUE"`` (``batch_edit`` asserts on it);
* ``BaseEditor.__init__`` sets the tokenizer's padding side from literal name lists; the wrapper
  builds a BLUE editor exactly as a MEMIT editor (the original ``__init__`` runs with
  ``hparams.alg_name`` temporarily ``"MEMIT"``), then points it back at BLUE;
* ``BaseEditor`` receives BLUE hyperparameters as :func:`easyedit_hparams_class` (BLUEHyperParams
  that also derives from EasyEdit's ``HyperParams``; :class:`BLUEHyperParams` itself knows nothing
  of EasyEdit);
* weight restore (``editors/utils.py``): MEMIT/AlphaEdit use the default path (copy
  ``weights_copy`` back); BLUE needs nothing but not being in the special restore sets, which is
  checked.

Everything is idempotent and leaves other algorithms untouched (the wrappers only act when the
algorithm name is ``"BLUE"``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from copy import copy as shallow_copy
from pathlib import Path
from typing import Any, Optional, Sequence

from ..editing.editor import apply_blue_to_model
from ..hparams import BLUEHyperParams
from .easyedit_import import (
    EASYEDIT_ROOT_ENV,
    available_root,
    easyedit_hyperparams_base,
    easyedit_root,
    import_easyeditor,
    last_placeholders,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ALG_NAME",
    "EASYEDIT_ROOT_ENV",
    "EasyEditModel",
    "apply_blue_easyedit",
    "easyedit_hparams",
    "easyedit_hparams_class",
    "easyedit_hyperparams_base",
    "easyedit_root",
    "import_easyeditor",
    "register_with_easyedit",
    "try_register",
    "with_model",
]

#: The name under which BLUE is registered in EasyEdit (``alg_name`` in the YAML files).
ALG_NAME = "BLUE"
#: The EasyEdit algorithm BLUE is set up like by ``BaseEditor`` (model loading, padding side).
_TEMPLATE_ALG = "MEMIT"
_MARK = "__blue_plugin_wrapped__"


# ------------------------------------------------------------------------------------------------
# The adapter EasyEdit calls
# ------------------------------------------------------------------------------------------------
def apply_blue_easyedit(
    model,
    tok,
    requests: Sequence[dict],
    hparams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
):
    """EasyEdit's ``apply_algo`` for BLUE: forwards to :func:`blue_plugin.editing.editor.apply_blue_to_model`.

    EasyEdit calls it as ``apply_algo(model, tok, requests, hparams, copy=False,
    return_orig_weights=True[, keep_original_weight=False, train_ds=None])`` and expects
    ``(model, weights_copy)`` with ``weights_copy`` mapping full parameter names to their
    pre-edit tensors (it copies them back after a non-sequential edit).
    """
    kwargs.pop("train_ds", None)  # only meaningful for IKE; EasyEdit passes train_ds=None
    return apply_blue_to_model(
        model,
        tok,
        requests,
        hparams,
        copy=copy,
        return_orig_weights=return_orig_weights,
        keep_original_weight=keep_original_weight,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------
# Passing a loaded model to BaseEditor
# ------------------------------------------------------------------------------------------------
class EasyEditModel(tuple):
    """``(model, tok)`` for ``hparams.model_name``, with a name.

    EasyEdit's ``BaseEditor`` accepts ``hparams.model_name = (model, tok)`` instead of a name, but
    its evaluators then call ``model_name.lower()``, which a bare tuple does not have. This tuple
    answers ``lower()`` / ``str()`` with ``name``.
    """

    name: str

    def __new__(cls, model, tok, name: Optional[str] = None) -> "EasyEditModel":
        if model is None or tok is None:
            raise ValueError("EasyEditModel needs a model and its tokenizer, got None.")
        obj = super().__new__(cls, (model, tok))
        if name is None:
            config = getattr(model, "config", None)
            name = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None) or type(model).__name__
        obj.name = str(name)
        return obj

    def __getnewargs__(self):
        return (self[0], self[1], self.name)

    def lower(self) -> str:
        return self.name.lower()

    def split(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.name.split(*args, **kwargs)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"EasyEditModel({self.name!r})"


def with_model(hparams, model, tok, name: Optional[str] = None):
    """A copy of ``hparams`` whose ``model_name`` is ``EasyEditModel(model, tok, name)``.

    ``BaseEditor.from_hparams(with_model(hp, model, tok))`` then edits this model instead of
    loading one by name (EasyEdit picks loaders by substrings of ``model_name``). ``device`` is set
    to the device of the model's weights, because ``BaseEditor`` moves the model to
    ``hparams.device`` (an integer there means ``cuda:N``).
    """
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        raise ValueError("with_model: 'model' must be a torch module with parameters.") from None
    new = dataclasses.replace(hparams) if dataclasses.is_dataclass(hparams) else shallow_copy(hparams)
    new.model_name = EasyEditModel(model, tok, name)
    new.device = str(device)
    return new


# ------------------------------------------------------------------------------------------------
# The hyperparameter class EasyEdit receives
# ------------------------------------------------------------------------------------------------
_EASYEDIT_CLASSES: dict[type, type] = {}


def _hyperparams_class() -> Optional[type]:
    """``easyeditor.util.hparams.HyperParams`` of the imported EasyEdit, or None."""
    try:
        from easyeditor.util.hparams import HyperParams  # type: ignore
    except ImportError:  # pragma: no cover - older EasyEdit
        return None
    return HyperParams


def easyedit_hparams_class(hyperparams_base: type) -> type:
    """``EasyEditBLUEHyperParams(BLUEHyperParams, hyperparams_base)``: :class:`BLUEHyperParams`
    (fields, validation, ``from_hparams``, ``to_dict``) that is also an EasyEdit ``HyperParams``;
    one class per base class. ``BaseEditor`` receives BLUE hyperparameters as this class."""
    cls = _EASYEDIT_CLASSES.get(hyperparams_base)
    if cls is None:
        doc = f"BLUEHyperParams that is also EasyEdit's {hyperparams_base.__module__}.{hyperparams_base.__qualname__}."
        cls = type("EasyEditBLUEHyperParams", (BLUEHyperParams, hyperparams_base), {"__module__": __name__, "__doc__": doc})
        _EASYEDIT_CLASSES[hyperparams_base] = cls
    return cls


def easyedit_hparams(hparams: BLUEHyperParams, hyperparams_base: Optional[type] = None) -> BLUEHyperParams:
    """``hparams`` as an :func:`easyedit_hparams_class` instance with the same state (a shallow copy;
    ``hparams`` itself when it already is one). ``hyperparams_base`` defaults to the HyperParams of
    the imported EasyEdit (:func:`import_easyeditor`)."""
    if hyperparams_base is None:
        import_easyeditor()
        hyperparams_base = _hyperparams_class()
        if hyperparams_base is None:
            raise ImportError("easyeditor.util.hparams.HyperParams not found in the imported EasyEdit")
    cls = easyedit_hparams_class(hyperparams_base)
    if isinstance(hparams, cls):
        return hparams
    new = shallow_copy(hparams)
    new.__class__ = cls
    return new


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def _is_batchable_wrapper(original):
    def is_batchable_method(alg_name: str) -> bool:
        return alg_name == ALG_NAME or original(alg_name)

    is_batchable_method.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(is_batchable_method, _MARK, True)
    return is_batchable_method


def _init_wrapper(original, alg_dict: dict, hyperparams_base: Optional[type]):
    def __init__(self, hparams, *args: Any, **kwargs: Any) -> None:
        if getattr(hparams, "alg_name", None) != ALG_NAME:
            return original(self, hparams, *args, **kwargs)
        if hyperparams_base is not None and isinstance(hparams, BLUEHyperParams):
            hparams = easyedit_hparams(hparams, hyperparams_base)
        # Build the editor exactly as for MEMIT (model loading, padding side), then switch to BLUE.
        hparams.alg_name = _TEMPLATE_ALG
        try:
            original(self, hparams, *args, **kwargs)
        finally:
            hparams.alg_name = ALG_NAME
        self.alg_name = ALG_NAME
        self.apply_algo = alg_dict[ALG_NAME]

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    __init__.__doc__ = getattr(original, "__doc__", None)
    setattr(__init__, _MARK, True)
    return __init__


def register_with_easyedit(
    verbose: bool = True,
    root: Optional[str | os.PathLike] = None,
    force: bool = False,
) -> dict[str, Any]:
    """Register ``BLUE`` with EasyEdit (importing it first, see :func:`import_easyeditor`).

    Idempotent: a second call changes nothing and reports ``"already"`` for each point. Raises
    :class:`ImportError` when EasyEdit cannot be imported and :class:`ValueError` when
    ``ALG_DICT["BLUE"]`` already holds a different function (pass ``force=True`` to replace it).
    Returns a report ``{point: what was done}`` (also logged at INFO level when ``verbose``).
    """
    ee = import_easyeditor(root)
    from easyeditor.editors import batch_editor as be_mod  # type: ignore
    from easyeditor.editors import editor as ed_mod  # type: ignore
    from easyeditor.util import alg_dict as ad_mod  # type: ignore

    report: dict[str, Any] = {"alg_name": ALG_NAME, "easyeditor": str(Path(ee.__file__).parent)}

    # 1. ALG_DICT (the editor module star-imports the same dict; cover both if they ever differ).
    dicts = [ad_mod.ALG_DICT]
    if getattr(ed_mod, "ALG_DICT", ad_mod.ALG_DICT) is not ad_mod.ALG_DICT:
        dicts.append(ed_mod.ALG_DICT)
    status = "already"
    for d in dicts:
        current = d.get(ALG_NAME)
        if current is apply_blue_easyedit:
            continue
        if current is not None and not force:
            raise ValueError(
                f"EasyEdit's ALG_DICT[{ALG_NAME!r}] already holds {current!r}; "
                "call register_with_easyedit(force=True) to replace it with blue_plugin's BLUE."
            )
        d[ALG_NAME] = apply_blue_easyedit
        status = "registered" if current is None else "replaced"
    report["ALG_DICT"] = status

    # 2. BatchEditor.is_batchable_method (batch_edit asserts on it).
    batch_editor = be_mod.BatchEditor
    current = batch_editor.is_batchable_method
    if getattr(current, _MARK, False):
        report["is_batchable_method"] = "already"
    elif current(ALG_NAME):
        report["is_batchable_method"] = "native"
    else:
        setattr(batch_editor, "is_batchable_method", staticmethod(_is_batchable_wrapper(current)))
        report["is_batchable_method"] = "wrapped"

    # 3. BaseEditor.__init__ (padding side chosen from literal lists of names).
    base_editor = ed_mod.BaseEditor
    init = base_editor.__dict__.get("__init__")
    if getattr(init, _MARK, False):
        report["BaseEditor.__init__"] = "already"
    else:
        base_editor.__init__ = _init_wrapper(init, ad_mod.ALG_DICT, _hyperparams_class())
        report["BaseEditor.__init__"] = f"wrapped (BLUE is set up like {_TEMPLATE_ALG})"

    # 4. Weight restore: BLUE must take the default weights_copy path, as MEMIT/AlphaEdit do.
    try:
        from easyeditor.editors import utils as eu_mod  # type: ignore
    except ImportError:  # pragma: no cover - older EasyEdit
        eu_mod = None
    special = {
        name: getattr(eu_mod, name)
        for name in ("CALLABLE_RESTORE_ALGS", "PEFT_RESTORE_ALGS", "KEEP_EDITED_MODEL_ALGS")
        if eu_mod is not None and hasattr(eu_mod, name)
    }
    clash = [name for name, algs in special.items() if ALG_NAME in algs]
    if clash:
        raise ValueError(
            f"EasyEdit lists {ALG_NAME!r} in {', '.join(clash)}; BLUE returns a weights_copy dict and "
            "must use the default restore path. Remove it from those sets."
        )
    report["restore"] = "default weights_copy path (as MEMIT/AlphaEdit)" if special else "n/a (no restore lists)"

    # 5. Facts the user may want to know: the hyperparameter class BaseEditor receives for BLUE.
    hyperparams_base = _hyperparams_class()
    report["BLUEHyperParams_is_EasyEdit_HyperParams"] = (
        issubclass(easyedit_hparams_class(hyperparams_base), hyperparams_base)
        if hyperparams_base is not None else "unknown (easyeditor.util.hparams.HyperParams not found)"
    )
    report["placeholders"] = last_placeholders()
    if verbose:
        logger.info("BLUE registered with EasyEdit: %s", report)
    return report


def try_register() -> Optional[dict[str, Any]]:
    """Register BLUE if EasyEdit is importable; otherwise return ``None`` quietly.

    Called when ``blue_plugin`` is imported. EasyEdit counts as available when ``easyeditor``
    is already imported, is on ``sys.path``, or ``$EASYEDIT_ROOT`` names a checkout. Set
    ``BLUE_PLUGIN_NO_EASYEDIT=1`` to skip this (importing EasyEdit takes several seconds).
    Problems (EasyEdit present but not importable, ``BLUE`` taken) are logged as warnings.
    """
    available, root = available_root()
    if not available:
        return None
    try:
        return register_with_easyedit(verbose=False, root=root)
    except (ImportError, ValueError) as exc:
        logger.warning("EasyEdit found but BLUE was not registered: %s", exc)
        return None
