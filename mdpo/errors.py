"""User-facing errors: the CLI prints these as one line and exits 2, never as a traceback."""


class MdpoError(Exception):
    """Base of every error caused by user input (config, data, checkpoint, layout)."""


class ConfigError(MdpoError):
    """A config key is missing, unknown, of the wrong type or out of range."""


class DataError(MdpoError):
    """A data file or row cannot be used; the message names file:row."""
