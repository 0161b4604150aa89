"""blue_plugin: BLUE (Boundary Layer UpdatE) for locate-then-edit model editing.

Public API: :class:`BLUEHyperParams`, :func:`apply_blue_to_model`, :func:`load_model`,
:class:`EditState` / :func:`get_state` / :func:`reset_state`, :class:`EditSession`,
:class:`EditObserver`, :func:`register_with_easyedit`. The layers of the package are described in
``docs/architecture.md``.

Importing the package registers ``BLUE`` with EasyEdit when ``easyeditor`` is importable, and
does nothing otherwise.
"""
import logging

from .editing.editor import Editor, apply_blue_to_model
from .editing.observer import EditObserver
from .editing.session import BLUESessionError, EditSession
from .editing.state import EditState, get_state, reset_state
from .errors import BLUEConfigError, BLUEEditError, BLUERequestError
from .hparams import BLUEHyperParams
from .model.loading import default_cache_dir, load_model
from .integrations.easyedit import EasyEditModel, register_with_easyedit, try_register, with_model

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "BLUEHyperParams",
    "BLUEConfigError",
    "BLUEEditError",
    "BLUERequestError",
    "BLUESessionError",
    "EditObserver",
    "EditSession",
    "EditState",
    "Editor",
    "apply_blue_to_model",
    "default_cache_dir",
    "get_state",
    "load_model",
    "register_with_easyedit",
    "EasyEditModel",
    "with_model",
    "reset_state",
]

try_register()
