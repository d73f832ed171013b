"""Error types and process exit codes shared by every command.

A ``UserError`` is a problem with the user's input (config, paths, data). The CLI
prints it as one line and exits with ``EXIT_USAGE`` on every rank; it never
shows a traceback.
"""

EXIT_OK = 0
EXIT_FAILURE = 1      # a bug or an unexpected runtime failure
EXIT_USAGE = 2        # bad input: one line on stderr, nothing written
EXIT_REQUEUE = 3      # stopped on a signal after a committed checkpoint: requeue the job
EXIT_PEER_DEAD = 4    # a peer rank stopped answering (heartbeat timeout)


class UserError(Exception):
    """Bad input. ``str(err)`` is the single line shown to the user."""


class RequeueRequested(Exception):
    """Raised after the checkpoint that follows SIGUSR1/SIGTERM has been committed."""
