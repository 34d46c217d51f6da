"""The one way a repair replaces a fairseq function (or class): wrapped once per repair, however often
``install()`` runs; several repairs may wrap one function (``Trainer.train_step``: the monitor's and the guard's).

    >>> class Owner:
    ...     @staticmethod
    ...     def f(x):
    ...         return x
    >>> def plus_one(f):
    ...     return lambda x: f(x) + 1
    >>> wrap_once(Owner, "f", plus_one); wrap_once(Owner, "f", plus_one)   # the second install is a no-op
    >>> Owner.f(1), sorted(wrapped_by(Owner.f))
    (2, ['fairseq_plugins.repairs._wrap.plus_one'])
"""

from typing import Any, Callable, FrozenSet, Optional

__all__ = ["wrap_once", "wrapped_once", "wrapped_by", "MARK"]

#: set on every wrapper a repair installs: the keys of the repairs that wrapped it (its own and those of the
#: wrappers inside it), so a second ``install()`` (or a second import of the plugins under another module name)
#: sees that the function is already wrapped by that repair
MARK = "__wrapped_by_fairseq_plugins__"


def wrapped_by(fn: Any) -> FrozenSet[str]:
    """The keys of the repairs that wrapped ``fn`` (empty for fairseq's own function)."""
    done = getattr(fn, MARK, frozenset())
    return frozenset(done) if isinstance(done, (set, frozenset)) else frozenset()


def wrapped_once(fn: Any, make_wrapper: Callable[[Any], Any], key: Optional[str] = None) -> Any:
    """``make_wrapper(fn)``, marked with ``key`` (default: ``make_wrapper``'s module and name), or ``fn`` itself
    when the repair ``key`` has wrapped it already."""
    key = key or f"{make_wrapper.__module__}.{make_wrapper.__qualname__}"
    done = wrapped_by(fn)
    if key in done:
        return fn
    wrapper = make_wrapper(fn)
    setattr(wrapper, MARK, done | {key})
    return wrapper


def wrap_once(owner: Any, name: str, make_wrapper: Callable[[Any], Any], key: Optional[str] = None) -> None:
    """Replace ``owner.name`` by `wrapped_once` of it."""
    setattr(owner, name, wrapped_once(getattr(owner, name), make_wrapper, key))
