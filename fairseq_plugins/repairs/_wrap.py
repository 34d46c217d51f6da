"""The one way a repair replaces a fairseq function: wrapped once, however often ``install()`` runs."""

from typing import Any, Callable

#: set on every wrapper a repair installs, so a second ``install()`` (or a second import of the plugins under
#: another module name) sees the function is already ours
MARK = "__wrapped_by_fairseq_plugins__"


def wrap_once(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``make_wrapper(owner.name)`` unless a repair has wrapped it already."""
    current = getattr(owner, name)
    if getattr(current, MARK, False):
        return
    wrapper = make_wrapper(current)
    setattr(wrapper, MARK, True)
    setattr(owner, name, wrapper)
