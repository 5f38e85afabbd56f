"""Errors the API reports to clients: each carries an HTTP status and a one-line message."""

from __future__ import annotations


class CorralError(Exception):
    """A user-facing error: one line, no traceback."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CorralError):
    status = 400


class NotFound(CorralError):
    status = 404


class Conflict(CorralError):
    status = 409


class Forbidden(CorralError):
    status = 403


class NotManager(CorralError):
    status = 503

    def __init__(self) -> None:
        super().__init__(
            "This node is not a swarm manager. Worker nodes can't be used to view or modify "
            "cluster state. Please run this command on a manager node or promote the current "
            "node to a manager."
        )


class NotInSwarm(CorralError):
    status = 503

    def __init__(self) -> None:
        super().__init__(
            'This node is not a swarm manager. Use "corral swarm init" or "corral swarm join" '
            "to connect this node to swarm and try again."
        )


class SequenceConflict(CorralError):
    """An update was based on a stale version of the object (optimistic concurrency)."""

    status = 409
