"""Errors a user can fix (configuration, environment), reported as one line before any heavy work."""

from __future__ import annotations


class SetupError(Exception):
    """Bad configuration or environment, detected before models load or prompts run."""


class MissingAPIKeyError(SetupError):
    """An API backend names an environment variable that is not set."""


class FatalAPIError(Exception):
    """The API rejects every call (wrong key, unknown model, no such route): retrying cannot help."""
