"""The editing core: requests, context prefixes, targets, keys, update rules, edit state, the editor, dynamic layer selection and sessions."""
from .observer import EditObserver

__all__ = ["EditObserver"]
