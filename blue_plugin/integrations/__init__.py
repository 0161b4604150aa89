"""Adapters to host frameworks (EasyEdit)."""
