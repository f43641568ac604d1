"""Errors the CLI turns into a one-line message and exit code 2 (no traceback): bad input, not a bug."""


class TrainingSetupError(ValueError):
    """Bad data file, mismatched models, unusable options; the message names the file and the fix."""


class DataError(TrainingSetupError):
    """A data file that is missing, empty or not in the expected schema."""
