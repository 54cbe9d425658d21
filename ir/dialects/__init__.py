"""Dialects: each module declares its ops (see ir/registry.py)."""
