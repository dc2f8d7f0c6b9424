"""Errors that are the user's to fix: the command line shows them as one line and exits with 2."""


class UsageError(Exception):
    """Bad input (a config, a path, a model folder, a data source); the message says how to fix it."""


class DataError(UsageError):
    """A data source that yields no usable clip."""


class ModelFolderError(UsageError):
    """A folder that is not a saved vidmoe model."""
