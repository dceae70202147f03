"""User-facing errors: the CLI prints these as one line and exits 2, never as a traceback."""


class MdpoError(Exception):
    """Base of every error caused by user input (config, data, checkpoint, layout)."""


class ConfigError(MdpoError):
    """A config key is missing, unknown, of the wrong type or out of range."""


class DataError(MdpoError):
    """A data file or row cannot be used; the message names file:row."""


def cause(err: BaseException, limit: int = 300) -> str:
    """One line saying why a library call failed: the last line of its message (torch's CheckpointException and
    chained errors put every rank's traceback first and the actual error last), or its type's name."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:limit] if lines else type(err).__name__
