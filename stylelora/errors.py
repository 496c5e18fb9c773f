"""The one exception type for mistakes a user can fix: the CLI prints its message as one line."""


class UserError(Exception):
    """Bad input: a config value, a path, a file. The message names it and says what to do."""


def first_line(exc: BaseException) -> str:
    """An exception's message as one line: its first, or the exception's type when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
