"""The demo (``syncbus demo``): a world of emulated systems, the run and its view.
"""

__all__: list[str] = []
