"""What both importers report: a note per setting not carried over as it was,
and the error when nothing can be converted at all."""


class ImportNote:
    """The text of an importer's note. A subclass (a frozen dataclass with
    line, setting, reason and outcome) says where the setting was: `where`."""

    def __str__(self):
        return f"{self.where}: {self.setting}: {self.reason}: {self.outcome}"

    def located(self, path):
        """The note as `PATH:LINE: ...` (a compiler's diagnostic)."""
        place = f"{path}:{self.line}" if self.line else path
        return f"{place}: {self}"


class ImportFailed(Exception):
    """The file cannot be converted at all; .notes says what was found."""

    def __init__(self, message, notes=()):
        super().__init__(message)
        self.notes = list(notes)
