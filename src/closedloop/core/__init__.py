"""Shared core: definitions, the engine over one Ibis connection, the table catalogue, clock and ids."""
