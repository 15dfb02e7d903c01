"""SQLite state store (WAL, versioned schema) shared by all processes."""

from smolvm.state.store import SCHEMA_VERSION, StateError, StateStore

__all__ = ["StateStore", "StateError", "SCHEMA_VERSION"]
