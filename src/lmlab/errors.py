"""The error type for problems a user can fix (bad flags, configs, data, checkpoints).

Entry points print its message as one line (`error: ...`) and exit with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message is one line saying what is wrong and what to do."""
