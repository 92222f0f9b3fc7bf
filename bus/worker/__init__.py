"""The worker process (``syncbus run``): links, detectors, monitor, metrics and health.
"""

__all__: list[str] = []
