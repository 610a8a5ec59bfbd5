"""One base class for problems the user can fix (bad flag, missing file, foreign checkpoint):
the CLIs print them as one line and exit non-zero instead of showing a traceback."""


class UserError(Exception):
    pass


class ConfigError(UserError, ValueError):
    pass


class CheckpointError(UserError):
    pass


class ModelError(UserError, ValueError):
    """A model that cannot be built as asked (unknown name, a size out of bounds)."""
