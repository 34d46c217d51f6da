"""A small self-contained family of residual stacks (Post-LN, Pre-LN, Admin, DeepNorm).

Used to measure the output change against depth (`admin_torch.output_change`,
``benchmarks/output_change.py``) and as the reference model of [`admin_torch.fold`][admin_torch.fold].
Each layer is a self-attention sublayer and/or a ReLU feed-forward sublayer of width ``dim``;
the input ``(batch, time, dim)`` goes through a LayerNorm first, so every kind starts from a
normalized stream as a Post-LN transformer does after its embedding LayerNorm.
"""

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolbox_core import validation

from .deepnorm import DeepNormResidual, deepnorm_init, deepnorm_scale_
from .qk_norm import QKNorm
from .residual import OUTPUT_CHANGE_SCALES, OmegaResidual, calculate_init, check_operands

__all__ = ["STACK_KINDS", "SUBLAYER_PATTERNS", "AddResidual", "SelfAttention", "FeedForward", "ResidualStack", "make_stack"]

#: the kinds [`make_stack`][admin_torch.make_stack] builds.
STACK_KINDS = ("post_ln", "pre_ln", "admin", "deepnorm")
#: the sublayers of one layer.
SUBLAYER_PATTERNS = {"ffn": ("ffn",), "attn_ffn": ("attn", "ffn")}


class AddResidual(nn.Module):
    """The plain residual ``x + f_x``."""

    def forward(self, x: Tensor, f_x: Tensor) -> Tensor:
        check_operands(x, "f_x", f_x, x.device if isinstance(x, Tensor) else None, "x")
        return x + f_x


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` as in fairseq.

    ``causal=True``: each position attends to itself and the earlier ones (a language model).
    ``qk_norm=True``: qk-layernorm, ``LN(q_h) . LN(k_h)`` per head ([`admin_torch.QKNorm`][admin_torch.QKNorm] as
    ``q_norm`` / ``k_norm``; [`admin_torch.add_qk_norm`][admin_torch.add_qk_norm] adds them to an existing module).
    """

    #: it applies ``q_norm`` / ``k_norm`` once they are set: [`admin_torch.add_qk_norm`][admin_torch.add_qk_norm] adds them
    supports_qk_norm = True

    def __init__(self, dim: int, heads: int, *, causal: bool = False, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
        self.heads = heads
        self.causal = validation.as_bool("causal", causal)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        if validation.as_bool("qk_norm", qk_norm):
            self.q_norm, self.k_norm = QKNorm(dim, heads), QKNorm(dim, heads)

    def input_linears(self) -> List[nn.Linear]:
        """The linear maps that read the sublayer input."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k = self.q_proj(x), self.k_proj(x)
        if getattr(self, "q_norm", None) is not None:  # qk-layernorm (added here or by add_qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = split(q), split(k), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=getattr(self, "causal", False))
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """``fc2(relu(fc1(x)))``."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def input_linears(self) -> List[nn.Linear]:
        return [self.fc1]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ResidualStack(nn.Module):
    """A stack of residual sublayers; see [`make_stack`][admin_torch.make_stack].

    Post-LN / Admin / DeepNorm: ``h = LN_i(res_i(h, f_i(h)))``; Pre-LN: ``h = h + f_i(LN_i(h))``
    and a final LayerNorm. ``input_norm`` normalizes the input first.

    Shape: input and output ``(batch, time, dim)``.
    """

    def __init__(self, kind: str, sublayers: List[nn.Module], residuals: List[nn.Module], dim: int):
        super().__init__()
        self.kind = kind
        self.input_norm = nn.LayerNorm(dim)
        self.sublayers = nn.ModuleList(sublayers)
        self.residuals = nn.ModuleList(residuals)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in sublayers)
        self.final_norm = nn.LayerNorm(dim) if kind == "pre_ln" else None

    def forward(self, x: Tensor) -> Tensor:
        weight = self.input_norm.weight
        dim = weight.shape[0]
        validation.check_tensor("x", x, last_dim=dim, shape=f"(*, dim={dim})")
        validation.check_device("x", x, weight.device, "the stack's parameters")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the stack's dtype {weight.dtype} (or run under torch.autocast), got {x.dtype}")
        h = self.input_norm(x)
        if self.kind == "pre_ln":
            for f, res, ln in zip(self.sublayers, self.residuals, self.norms):
                h = res(h, f(ln(h)))
            return self.final_norm(h)
        for f, res, ln in zip(self.sublayers, self.residuals, self.norms):
            h = ln(res(h, f(h)))
        return h


def make_stack(
    kind: str,
    depth: int,
    dim: int = 64,
    *,
    scale: str = "O(logn)",
    sublayers: str = "attn_ffn",
    heads: int = 4,
    ffn_dim: Optional[int] = None,
    as_parameter: bool = False,
    seed: Optional[int] = None,
    causal: bool = False,
    qk_norm: bool = False,
) -> ResidualStack:
    """A residual stack of ``depth`` layers for output-change measurements and folding tests.

    Args:
        kind: ``'post_ln'``, ``'pre_ln'``, ``'admin'`` (Post-LN with [`OmegaResidual`][admin_torch.OmegaResidual],
            closed-form omega for N = depth * sublayers per layer) or ``'deepnorm'`` (encoder-only
            DeepNorm with N = depth layers).
        depth: the number of layers (an integer >= 1; NumPy integers are accepted).
        dim: the model width (>= 1).
        scale: Admin's output change scale (``'O(n)'``, ``'O(logn)'``, ``'default'``, ``'O(1)'``).
        sublayers: ``'attn_ffn'`` (2 sublayers per layer, as a transformer encoder) or ``'ffn'``.
        heads: attention heads.
        ffn_dim: the feed-forward width, an integer >= 1 (default ``4 * dim``).
        as_parameter: Admin only: trainable vector omegas.
        seed: seeds the weight init when given.
        causal: causal self-attention (each position sees itself and the earlier ones: a language model).
        qk_norm: qk-layernorm in every attention sublayer (Wortsman et al. 2023's remedy for attention-logit
            growth; `admin_torch.qk_norm`); its LayerNorms are kept as they are by folding.

    Linear weights are xavier-uniform with zero biases (fairseq's transformer init); DeepNorm
    re-initializes fc1, fc2, v_proj, out_proj with ``xavier_normal_(gain=beta)``.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range (the message names it
            and the accepted values), e.g. ``ffn_dim <= 0`` or ``heads`` not dividing ``dim``.

    Examples:
        >>> model = make_stack('admin', depth=6, dim=32, scale='O(1)')
        >>> model(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """
    kind = validation.as_choice("kind", kind, STACK_KINDS)
    sublayers = validation.as_choice("sublayers", sublayers, tuple(SUBLAYER_PATTERNS))
    # counts as Python ints (NumPy integers and one-element integer tensors accepted), each >= 1
    depth = validation.as_int("depth", depth, minimum=1)
    dim = validation.as_int("dim", dim, minimum=1)
    heads = validation.as_int("heads", heads, minimum=1)
    ffn_dim = 4 * dim if ffn_dim is None else validation.as_int("ffn_dim", ffn_dim, minimum=1)
    if "attn" in SUBLAYER_PATTERNS[sublayers] and dim % heads:
        raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
    if kind == "admin":
        validation.as_choice("scale", scale, OUTPUT_CHANGE_SCALES)
    as_parameter = validation.as_bool("as_parameter", as_parameter)
    causal = validation.as_bool("causal", causal)
    qk_norm = validation.as_bool("qk_norm", qk_norm)
    if seed is not None:
        seed = validation.as_int("seed", seed)
    pattern = SUBLAYER_PATTERNS[sublayers]
    num_res = depth * len(pattern)
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        subs: List[nn.Module] = []
        for _ in range(depth):
            for p in pattern:
                subs.append(SelfAttention(dim, heads, causal=causal, qk_norm=qk_norm) if p == "attn"
                            else FeedForward(dim, ffn_dim))
        for m in subs:
            for lin in m.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
        if kind == "admin":
            omega = calculate_init(num_res, scale)
            residuals = [OmegaResidual(omega, as_parameter=as_parameter, embed_dim=dim if as_parameter else None) for _ in subs]
        elif kind == "deepnorm":
            c = deepnorm_init(num_encoder_layers=depth)
            residuals = [DeepNormResidual(c.encoder_alpha) for _ in subs]
            scaled = [getattr(m, n) for m in subs for n in ("fc1", "fc2", "v_proj", "out_proj") if hasattr(m, n)]
            deepnorm_scale_(scaled, c.encoder_beta)
        else:
            residuals = [AddResidual() for _ in subs]
        model = ResidualStack(kind, subs, residuals, dim)
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return model
