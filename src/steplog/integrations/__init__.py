"""Adapters that let other frameworks log through steplog."""
