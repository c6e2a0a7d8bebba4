"""Storage behind one module: runs, rounds, nodes and every published global model."""

from dropfleet.server.store.store import Store

__all__ = ["Store"]
