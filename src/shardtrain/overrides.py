"""Whether a user's class overrides a hook: the one test every "called, or refused" check uses."""

from __future__ import annotations


def overrides(owner: object, name: str, base: type) -> bool:
    """Whether ``type(owner)`` defines ``name`` in a class below ``base`` (the user's own code)."""
    for cls in type(owner).__mro__:
        if cls is base:
            return False
        if name in cls.__dict__:
            return True
    return False
