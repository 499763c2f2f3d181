"""Storage behind a narrow interface (server.storage.interface.Store)."""
