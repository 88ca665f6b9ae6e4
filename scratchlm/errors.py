"""The one exception type for user mistakes: the CLI prints it as one line and exits with 2."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad recipe key, missing checkpoint...)."""
