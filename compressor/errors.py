"""One exception type for mistakes a user can fix, so the CLI prints one line, not a traceback."""


class CompressorError(Exception):
    """A bad input or a missing resource, with a message that says what to do."""


class BudgetError(CompressorError):
    """The requested MAC/parameter budget cannot be met by this model."""


class CheckpointError(CompressorError):
    """A checkpoint file is missing, corrupt, or does not match its architecture spec."""


class DataError(CompressorError):
    """A data set cannot be found, downloaded or read."""


class TraceError(CompressorError):
    """Torch-Pruning cannot trace the model, so its channels cannot be coupled safely."""
