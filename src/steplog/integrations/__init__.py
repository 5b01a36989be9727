"""Adapters that let other libraries' logging APIs write through a steplog logger."""
