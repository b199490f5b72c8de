"""The one exception type that means "the user asked for something that cannot be done"."""


class UserError(Exception):
    """A mistake in what was asked (a missing folder, an impossible option, an unknown bucket).

    The CLI reports it in one line, ``lungseg <job>: error: <message>``, with exit status 2 and
    no traceback, so the message must name what is wrong and where.
    """


EXIT_OK, EXIT_CRASHED, EXIT_USAGE, EXIT_IMAGES_FAILED = 0, 1, 2, 3
"""lungseg's exit statuses: all done; crashed; a mistake in the command or its inputs (a
:class:`UserError`); finished, but some images failed (their rows say why). A finished run's
manifest records its own (:func:`lungseg.runs.outputs.outcome`)."""
