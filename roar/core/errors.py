"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class RoarError(Exception):
    """A problem with the user's input (config, data, files) rather than a bug in roar.

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback, so the
    message itself must say what is wrong and, where possible, what to do about it.
    """
