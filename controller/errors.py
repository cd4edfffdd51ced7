"""The one exception type users see: a message that says what to do next."""


class XknockError(Exception):
    """An error worth a one-line message, never a traceback."""
