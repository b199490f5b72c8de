"""The one exception type that means "the user asked for something that cannot be done"."""


class UserError(Exception):
    """A mistake in what was asked (a missing folder, an impossible option, an unknown bucket).

    The CLI reports it in one line, ``lungseg <job>: error: <message>``, with exit status 2 and
    no traceback, so the message must name what is wrong and where.
    """
