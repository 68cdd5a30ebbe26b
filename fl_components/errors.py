"""The project's exceptions, raised at the boundary with a message that says what to do."""


class FedpipeError(Exception):
    """Base of every error fedpipe raises on purpose."""


class ConfigError(FedpipeError):
    """A setting is missing, of the wrong type, or out of range."""


class DataError(FedpipeError):
    """A site's data is missing, unreadable or of the wrong shape."""


class RoundError(FedpipeError):
    """A round cannot complete (too few participants, all declined, ...)."""


class BudgetExhaustedError(FedpipeError):
    """A site declines a round that would take it past its privacy budget (max_epsilon)."""
