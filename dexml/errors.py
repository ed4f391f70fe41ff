"""Errors that reach the user as one readable message (the CLI prints them without a traceback)."""


class DexmlError(Exception):
    """Base class: a problem with the user's input, params or environment."""


class ConfigError(DexmlError):
    """Bad or missing params."""


class DataError(DexmlError):
    """A dataset file is missing, malformed or fails validation."""


class BundleError(DexmlError):
    """A deployable bundle is incomplete or has been tampered with."""
