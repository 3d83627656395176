"""Exceptions with messages that name the file, field or tensor at fault."""


class TeleChatError(Exception):
    """Base class of every error telechat_ms raises on bad input."""


class ConfigError(TeleChatError, ValueError):
    """A config file or field is missing, malformed or contradictory."""


class CheckpointError(TeleChatError, ValueError):
    """A checkpoint file or tensor is missing, truncated, unknown or of the wrong shape."""


class DataError(TeleChatError, ValueError):
    """A data file or record is malformed."""
