"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Exit status, for every command: 2 when the user's input is wrong (an
argument, a recipe or a file it names, a path that is not what the command
expects); 1 when a build or run fails (a stage, a verify gate, the network, a
full disk, a damaged package or cache file); 130 when interrupted.
"""


class SdbuildError(Exception):
    """A user-facing error: the message says what, where, and how to fix it."""

    exit_code = 1


class RecipeError(SdbuildError):
    """A recipe that does not validate (exit status 2)."""

    exit_code = 2


class UsageError(SdbuildError):
    """A command-line argument out of range or a path that is not what the command expects (exit status 2)."""

    exit_code = 2


class NotBuiltYet(SdbuildError):
    """A recipe asks for a feature whose stage is not built yet."""

    exit_code = 2


class ModelInputError(SdbuildError):
    """Inputs that do not match a model's declared inputs."""

    exit_code = 2


class UnsupportedOpError(SdbuildError):
    """The reference executor met an op it has no kernel for."""


class PackageError(SdbuildError):
    """A .mlpackage that is missing, truncated or corrupted."""


class WeightMismatchError(SdbuildError):
    """A checkpoint whose weights do not fit the module built from its config."""

    exit_code = 2
