"""Errors that more than one package raises or catches, defined once below all of them.

A package that needs another package's error class would otherwise import that package (the logit
cache's ``LogitCacheError`` is a ``TeacherError``, and the teacher providers read the cache).
"""


class TeacherError(RuntimeError):
    """A teacher that cannot be used (vocab mismatch, unreachable server, stale cache, ...)."""
