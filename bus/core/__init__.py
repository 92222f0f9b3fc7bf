"""Floor 0 of bus/: helpers every floor may use, with no broker and no state store:
redacting secrets (:mod:`bus.core.redact`) and logging (:mod:`bus.core.log`).
"""

__all__: list[str] = []
