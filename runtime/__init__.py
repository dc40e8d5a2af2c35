"""Executing compiled programs: generated wrappers, kernel launch, caches, arenas."""
