"""The one exception type that the CLI turns into a one-line error."""


class PersonavecError(Exception):
    """A user-facing error: the message is one line that names the file, line or flag at fault."""
