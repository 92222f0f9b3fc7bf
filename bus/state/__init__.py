"""The state store: cursors, leases, applied versions, record pairs, conflicts, run
history and the offline-transaction index, in one SQL database
(:class:`bus.state.store.StateStore`). Below the RabbitMQ runtime; imports no broker.
"""

__all__: list[str] = []
