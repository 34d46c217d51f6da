"""What a framework adds to [`convert`][admin_torch.convert] and [`fold`][admin_torch.fold]: the seam between
admin_torch's pure-torch core and the framework adapters above it (HuggingFace's: `admin_torch.hf_io`).

The core (`admin_torch.conversion`, `admin_torch.folding`) takes the adapters as an argument and calls each
step at its fixed point; it never imports an adapter. The public [`convert`][admin_torch.convert] and
[`fold`][admin_torch.fold] (`admin_torch.api`) pass `admin_torch.api.ADAPTERS`.

Examples:
    >>> from admin_torch.conversion import convert_model
    >>> class Announce(Adapter):
    ...     def after_convert(self, model, *, output_change_scale, as_parameter):
    ...         print(f"converted {type(model).__name__} ({output_change_scale})")
    >>> layer = nn.TransformerEncoderLayer(16, 2, 32)
    >>> _ = convert_model(layer, adapters=[Announce()])
    converted TransformerEncoderLayer (default)
"""

from torch import nn

__all__ = ["Adapter"]


class Adapter:
    """A framework's steps in [`convert`][admin_torch.convert] and [`fold`][admin_torch.fold]; here each does nothing.

    A subclass overrides the steps its framework needs. Each step is given the whole model and acts on the
    submodules of its framework (a torch.nn container may hold a HuggingFace model), doing nothing where
    there is none.
    """

    def check_family(self, model: nn.Module) -> None:
        """Raise ValueError where ``model``'s family must not be converted (HuggingFace: a Pre-LN
        ``model_type``). Called first, before the core looks for layers, so the refusal names the family."""

    def check_convertible(self, model: nn.Module) -> None:
        """Raise ValueError where ``model`` must not be converted.

        Called after the core's own checks and before anything is changed, so a refusal leaves ``model`` as
        it was.
        """

    def after_convert(self, model: nn.Module, *, output_change_scale: str, as_parameter: bool) -> None:
        """Called once ``model`` is converted (in place), with the settings it was converted with."""

    def after_fold(self, folded: nn.Module, *, untied: bool) -> None:
        """Called on the folded copy before it is returned.

        ``untied``: fold gave an embedding its own copy of a weight it shared (a tied output projection).
        """
