"""The subscriber API, at the import path subscribers' code uses: ``bus.subscribe``.

It lives in :mod:`bus.amqp.subscribe` with the rest of the RabbitMQ runtime; this
module only keeps the documented import stable (docs/events.md).
"""

from bus.amqp.subscribe import (
    EventHandler,
    PermanentError,
    Subscriber,
    SubscriberStats,
    TransientError,
    subscribe,
)

__all__ = ["EventHandler", "PermanentError", "Subscriber", "SubscriberStats", "TransientError",
           "subscribe"]
