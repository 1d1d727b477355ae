"""The one error type for bad user input."""


class InputError(ValueError):
    """A file, column or value the user handed in is unusable.

    The message names the file (or config key), the field and what to do about it, so that
    the command-line entry points can print it as one line instead of a traceback.
    """
