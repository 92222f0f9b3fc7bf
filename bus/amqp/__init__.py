"""The RabbitMQ runtime: topology, publisher, link consumer, message reading
(:mod:`~bus.amqp.peek`), the change-event and history streams, the dead-letter log and
its index writers, the subscriber API, and the translation of broker errors
(:mod:`~bus.amqp.errors`). The only floor that imports pika or kombu.
"""

__all__: list[str] = []
