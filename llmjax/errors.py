"""The one exception type for bad user input (flags, files, configs, checkpoints).

Raised at the edge, before any compute. Entry points catch it, print its one-line message and exit non-zero.
"""


class UserError(ValueError):
    """A problem the user can fix; the message names the problem and the fix on one line."""
