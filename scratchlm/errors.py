"""The exception types the CLI turns into one line: a user mistake (exit 2) or a fault of the run
(exit 1), such as a full disk or a diverged loss, where nothing was lost and the run can continue
once the cause is gone."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad recipe key, missing checkpoint...)."""


class RunFault(Exception):
    """The run stopped on a fault of its surroundings or its numbers (a full disk, a non-finite
    loss, out of GPU memory). The message says what happened and what to change; what was written
    before it is intact."""
