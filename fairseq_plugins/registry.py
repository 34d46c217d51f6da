"""Idempotent registration into fairseq's registries.

fairseq raises ``Cannot register duplicate ...`` when a plugin module runs twice, which happens
when the same file is reached under two module names (``--user-dir`` by path and an installed
``import fairseq_plugins``, or a worker process importing the user dir again). Every plugin in
this package registers through these wrappers, so a second import is a no-op that hands back the
class registered first.

Example:

    from fairseq_plugins.registry import register_once
    from fairseq.optim import OPTIMIZER_REGISTRY, register_optimizer

    @register_once(OPTIMIZER_REGISTRY, register_optimizer, "addsign", dataclass=AddSignConfig)
    class FairseqAddSign(FairseqOptimizer): ...
"""

from typing import Any, Callable, Dict


def register_once(registry: Dict[str, Any], register: Callable, name: str, **kwargs: Any) -> Callable:
    """Decorator: ``register(name, **kwargs)(cls)`` unless ``name`` is already in ``registry``."""

    def decorate(cls):
        if name in registry:
            return registry[name]
        return register(name, **kwargs)(cls)

    return decorate


def register_architecture_once(model_name: str, arch_name: str) -> Callable:
    """Like ``fairseq.models.register_model_architecture``, but a second import is a no-op."""
    from fairseq.models import ARCH_MODEL_REGISTRY, register_model_architecture

    def decorate(fn):
        if arch_name in ARCH_MODEL_REGISTRY:
            return fn
        return register_model_architecture(model_name, arch_name)(fn)

    return decorate
