"""Exceptions with messages that name the file, field or tensor at fault; the CLI maps them to exit codes."""


class TeleChatError(Exception):
    """Base class of every error telechat_ms raises on bad input (CLI exit code 2)."""

    exit_code = 2


class ConfigError(TeleChatError, ValueError):
    """A config file or field is missing, malformed or contradictory."""


class CheckpointError(TeleChatError, ValueError):
    """A checkpoint file or tensor is missing, truncated, unknown or of the wrong shape."""


class DataError(TeleChatError, ValueError):
    """A data file or record is malformed."""


class TrainingError(TeleChatError, RuntimeError):
    """Training cannot go on (NaN/Inf loss, ...); the message names the step (CLI exit code 3)."""

    exit_code = 3
