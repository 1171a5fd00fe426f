"""User-facing errors: each says what was wrong and how to fix it."""


class FlytuneError(Exception):
    """An error caused by the user's input (file, option, structure).

    The CLI prints its message on one line and exits with status 2, so the message
    must name the problem and the fix, e.g.
    ``"train.xyz: frame 3 has no forces; give a file whose frames carry forces"``.
    """
