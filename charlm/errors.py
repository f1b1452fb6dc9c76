"""The one exception type the library raises for problems a user can fix."""


class CharlmError(Exception):
    """A problem with the user's input or files. The message is one line that
    names the problem and what to do; the CLI prints it without a traceback."""
