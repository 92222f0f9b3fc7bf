"""The names of the headers syncbus sets on retried and dead-lettered messages.

A module of its own (no imports) so that every layer can name them: the consumer
writes them, :mod:`bus.amqp.peek` and the offline-transaction log read them.
"""

from __future__ import annotations

__all__ = ["LETTER_HEADER", "MARKER_HEADER", "headers"]

#: Header naming a dead letter written by a syncbus consumer (a uuid per copy).
LETTER_HEADER = "x-syncbus-letter"
#: Header of the markers that tell a reader of the dead-letter log it has seen it all.
MARKER_HEADER = "x-syncbus-marker"


class headers:  # noqa: N801 - a namespace of header names
    """Header names syncbus sets on retried and dead-lettered messages."""

    ATTEMPTS = "x-syncbus-attempts"
    LINK = "x-syncbus-link"
    ROUTING_KEY = "x-syncbus-routing-key"
    FIRST_FAILURE = "x-syncbus-first-failure"
    LAST_FAILURE = "x-syncbus-last-failure"
    ERROR = "x-syncbus-error"
    ERROR_CLASS = "x-syncbus-error-class"
    RESPONSE = "x-syncbus-response"
    #: Failed attempts in the current round (a replay starts a new round).
    ROUND = "x-syncbus-round"
    #: When the current round of retries began (the offline window runs from here).
    RETRY_SINCE = "x-syncbus-retry-since"
    #: The last failures, oldest first: [{"at", "class", "error"}].
    HISTORY = "x-syncbus-history"
    #: How often an operator replayed the transaction.
    REPLAYS = "x-syncbus-replays"
    #: The work queue the transaction belongs to (where a replay sends it).
    QUEUE = "x-syncbus-queue"
    #: When an operator archived the transaction.
    ARCHIVED_AT = "x-syncbus-archived-at"
