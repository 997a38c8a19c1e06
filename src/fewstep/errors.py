"""The one exception type for mistakes a user can make (bad path, bad shape, bad option).

The CLI prints its message without a traceback; library users can catch it like a ValueError.
"""


class FewstepError(ValueError):
    """A user-caused error, with a message that names the input and what was expected."""
