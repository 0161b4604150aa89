"""blue_plugin: BLUE (Boundary Layer UpdatE) for locate-then-edit model editing.

Public API: :class:`BLUEHyperParams`, :func:`apply_blue_to_model`, :func:`load_model`,
:class:`EditState`, :func:`register_with_easyedit`.
"""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
