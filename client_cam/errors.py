"""The one kind of failure the client reports: a single line saying what is wrong and what to do."""
from __future__ import annotations

EXIT_FAILED = 1  # could not start (server unreachable, refused, busy) or a device is missing
EXIT_USAGE = 2  # a bad flag or file


class ClientError(Exception):
    """Stops the client with one line on stderr; `exit_code` is what the process returns."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ServerRefused(ClientError):
    """The server answered but will not serve us (`code` is the server's error code: busy, unauthorized, ...)."""

    def __init__(self, code: str, message: str, retry: bool) -> None:
        super().__init__(message)
        self.code = code
        self.retry = retry  # worth trying again later (busy, lost) as opposed to a wrong token or config
