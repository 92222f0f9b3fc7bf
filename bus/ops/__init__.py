"""Operator tools: the offline-transaction log, conflicts, status, links, preview,
sync-all, tail, run history and schema pull. Used by the CLI (and the coming console).
"""

__all__: list[str] = []
