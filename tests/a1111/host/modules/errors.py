"""Stand-in ``modules.errors``: ``report`` logs instead of raising (the WebUI swallows hook errors)."""

import sys

reported: list = []


def report(message, *, exc_info=False):
    reported.append((message, sys.exc_info()[1]))
