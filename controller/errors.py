"""The one exception type users see: a message that says what to do next."""


class XknockError(Exception):
    """An error worth a one-line message, never a traceback."""


class LoadError(XknockError):
    """The program could not be loaded or attached: the interfaces it was meant
    for may be unfiltered (policy/failsafe.py closes their guarded ports)."""
