"""The one error type for user mistakes; its message is one line that says what to do."""


class ExportError(Exception):
    """Bad input to the export stage (missing model, existing output, ...): exit 2."""
