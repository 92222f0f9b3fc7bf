"""Configuration: loading (:mod:`~bus.config.load`), checking against the live systems
(:mod:`~bus.config.validate`), import/export (:mod:`~bus.config.io`) and drift.
"""

__all__: list[str] = []
