"""The exceptions a user of onebit can cause, and only those.

Every problem that comes from the user's input (an unknown name, a missing or corrupted
file, a tensor of the wrong shape) raises a subclass of :class:`OnebitError` with a
one-line message that names the problem. The CLI prints that line and exits with
status 2; any other exception is a bug in onebit.
"""


class OnebitError(Exception):
    """Base class of every user-facing onebit error."""


class UnknownNameError(OnebitError, KeyError):
    """A model, dataset, quantizer, optimizer or loss name that is not registered."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class ConfigError(OnebitError, ValueError):
    """An argument or setting that cannot work (a bit width out of range, a negative clip)."""


class DataError(OnebitError):
    """A dataset is missing, truncated, corrupted or of an unexpected format."""


class CheckpointError(OnebitError):
    """A checkpoint cannot be read or does not match the model it is loaded into."""


class FormatError(OnebitError):
    """A `.onebit` model file is invalid: wrong magic/version, bad header, bad checksum."""


class ShapeError(OnebitError, ValueError):
    """An input has the wrong shape or dtype for the model or kernel it is given to."""


class FileWriteError(OnebitError, OSError):
    """A file could not be written (disk full, no permission, read-only file system...).

    Both an :class:`OnebitError` (the CLI prints its one line and exits 2) and an
    :class:`OSError` (``errno`` is kept, ``except OSError`` handlers still see it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
