"""The one exception type that the CLI turns into a single line and a non-zero exit."""

from __future__ import annotations


def original_message(message: str, kind: type[BaseException]) -> str:
    """The message of a ``kind`` exception as it was raised, from the one PyTorch re-raises it with.

    An error in a DataLoader worker (or its pin-memory thread) comes back to the main process as
    ``kind("Caught <kind> in DataLoader worker process 0.\\nOriginal Traceback (most recent call
    last): ... <module>.<kind>: <message>")``: the worker's whole traceback, in which the original
    message is the text after the last line that names the exception's type. Any other message is
    returned as it is.
    """
    if not (message.startswith(f"Caught {kind.__name__} ") and "\nOriginal Traceback" in message):
        return message
    head = f"\n{kind.__module__}.{kind.__qualname__}: "
    at = message.rfind(head)
    return message[at + len(head) :].strip() if at >= 0 else message


class RoarError(Exception):
    """A problem with the user's input (config, data, files) rather than a bug in roar.

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback, so the
    message itself must say what is wrong and, where possible, what to do about it. A RoarError
    raised in a DataLoader worker keeps its own message: PyTorch re-raises it in the main process
    with the worker's traceback as the message, which is cut back to the original here.
    """

    def __init__(self, *args: object):
        if args and isinstance(args[0], str):
            args = (original_message(args[0], type(self)), *args[1:])
        super().__init__(*args)
