"""Errors a user can cause. The CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad config, bad input or bad usage: one line naming the key, file, row or stage."""

    exit_code = 2


class StageFailed(Exception):
    """A stage crashed for a reason that is not the user's input (exit 1)."""

    exit_code = 1


class Diverged(StageFailed):
    """A training stage's loss or gradients went non-finite, or its model holds a non-finite tensor:
    nothing is published (exit 1, like any stage failure: the stage ran, which a bad config does not)."""
