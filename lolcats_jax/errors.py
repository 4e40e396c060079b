"""User-facing errors: bad input (data, checkpoints, run directories) reported in one sentence, exit code 2."""


class UserError(Exception):
    """Something the user can fix; the message names the file/key and what was expected."""


class DataError(UserError):
    """A dataset file is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not match the model."""
