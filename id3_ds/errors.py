"""The one exception type users see from id3-ds.

Every failure a user can cause (bad config, wrong path, corrupt delta) is raised as ``ID3Error`` with a
one-line message that names the problem and the fix, so the CLI can print it without a traceback.
"""


class ID3Error(ValueError):
    """A user-facing error: the message names what is wrong and how to fix it."""


class SameOnEveryRank(ID3Error):
    """A user error that every rank finds identically (the config, the files it names, the data's size): rank 0
    reports it, the other ranks exit with the same code and say nothing, so the user reads it once."""
