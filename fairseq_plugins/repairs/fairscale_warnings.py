"""Silence fairscale's two deprecation warnings about its own code, printed by every fairseq tool.

fairseq-fixed 0.12.3.1 imports fairscale (installed for ``--zero-sharding os`` and ``--ddp-backend
fully_sharded``) whenever fairseq is imported. fairscale 0.4.13 decorates with torch's deprecated
``torch.cuda.amp.custom_fwd`` / ``custom_bwd`` at import, so torch >= 2.4 prints two ``FutureWarning``s on
every tool's stderr, about code that is neither the user's nor the toolbox's. `install` adds a warnings
filter for exactly those two messages; it must run before fairseq is first imported (it is the first of
[`fairseq_plugins.REPAIRS`][fairseq_plugins.REPAIRS]).
"""

import warnings

__all__ = ["install", "MESSAGE"]

#: the start of the two messages (a regular expression, as ``warnings.filterwarnings`` takes it)
MESSAGE = r"`torch\.cuda\.amp\.custom_(fwd|bwd)"


def _installed() -> bool:
    return any(action == "ignore" and category is FutureWarning and getattr(message, "pattern", None) == MESSAGE
               for action, message, category, _module, _line in warnings.filters)


def install() -> None:
    """Ignore fairscale's ``torch.cuda.amp.custom_fwd/bwd`` FutureWarnings (idempotent)."""
    if not _installed():
        warnings.filterwarnings("ignore", message=MESSAGE, category=FutureWarning)
