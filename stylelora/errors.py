"""The one exception type for mistakes a user can fix: the CLI prints its message as one line."""


class UserError(Exception):
    """Bad input: a config value, a path, a file. The message names it and says what to do."""
