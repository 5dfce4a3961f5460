"""Optional dependencies (the extras of setup.cfg): one import point that says which extra to install
instead of a bare ModuleNotFoundError. Tooling zone."""

from __future__ import annotations

import importlib


class MissingExtraError(ImportError):
    """An optional package a feature needs is not installed; the message is the one line to act on."""


def require(module: str, extra: str, purpose: str):
    """`import module`, or a MissingExtraError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed: pip install 'hf_mim[{extra}]' ({error})"
        ) from None


__all__ = ["MissingExtraError", "require"]
