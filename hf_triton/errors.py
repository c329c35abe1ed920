"""The one exception hierarchy of the package."""


class HfTritonError(Exception):
    """Base class: anything the tooling reports to a user as a plain message."""
