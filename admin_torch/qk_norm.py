"""qk-layernorm: a LayerNorm on the queries and the keys of every attention head.

Dehghani et al. 2023 (ViT-22B) and Wortsman et al. 2023 ("Small-scale proxies for large-scale
Transformer training instabilities") normalise each head's query and key before their dot product:

    logits = LN(q_h) . LN(k_h) / sqrt(d_head)        for every head h

which bounds the attention logits by ``|gamma|^2 * d_head / sqrt(d_head)`` plus bias terms and removes
*attention-logit growth*, the instability where ``q.k`` grows without bound at high learning rates and
the attention softmax collapses to one-hot. One LayerNorm over ``d_head`` (its ``gamma``/``beta`` of size
``d_head``, shared by the heads) for the queries and one for the keys, per attention module.

What this module gives:

* [`QKNorm`][admin_torch.QKNorm]: the per-head LayerNorm of a ``(..., heads * d_head)`` projection;
* [`QKNormMultiheadAttention`][admin_torch.QKNormMultiheadAttention]: ``torch.nn.MultiheadAttention`` with ``q_norm`` / ``k_norm``
  (same parameters, same call signature, masks and ``is_causal`` honoured);
* [`QKNormLinear`][admin_torch.QKNormLinear] / [`qk_norm_projections_`][admin_torch.qk_norm_projections_]: a query/key projection with its norm built in, for
  attention modules that call ``q_proj`` / ``k_proj`` (fairseq's ``--qk-norm`` uses it);
* [`add_qk_norm`][admin_torch.add_qk_norm]: in place, gives every attention module of a model qk-layernorm: torch.nn's
  ``MultiheadAttention`` (inside ``TransformerEncoderLayer`` / ``TransformerDecoderLayer``, Pre-LN or
  Post-LN, converted by [`admin_torch.convert`][admin_torch.convert] or not) and the reference stacks'
  `SelfAttention` (``make_stack(..., qk_norm=True)`` builds them so).

Nothing else changes: the new LayerNorms start at ``gamma = 1, beta = 0`` and are trained with the
model. They are not an identity, so adding them changes the function of a trained model (an
architecture for training from scratch, as in both papers). [`admin_torch.fold`][admin_torch.fold] keeps them
where they are (they read the projections, which folding leaves unchanged): nothing is folded into
or out of them.

Examples:
    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
    >>> layer = add_qk_norm(layer)
    >>> type(layer.self_attn).__name__, layer.self_attn.q_norm.norm.normalized_shape
    ('QKNormMultiheadAttention', (8,))
    >>> layer(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 32])
"""

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolbox_core import validation

__all__ = ["QKNorm", "QKNormMultiheadAttention", "QKNormLinear", "add_qk_norm", "has_qk_norm",
           "qk_norm_projections_"]


class QKNorm(nn.Module):
    """LayerNorm of each head's slice of a ``(..., heads * head_dim)`` projection.

    ``forward(x)`` views ``x`` as ``(..., heads, head_dim)``, applies ``layer_norm`` over ``head_dim``
    (one ``gamma``/``beta`` of size ``head_dim`` shared by the heads) and returns the original shape. ``x`` is
    floating, on the parameters' device, of their dtype (float16/bfloat16 also against float32 parameters, as
    ``layer_norm`` takes); anything else is a TypeError/ValueError naming ``x``.

    Args:
        dim: the projection's width (``heads * head_dim``), an integer >= 1.
        heads: the number of heads, an integer >= 1 dividing ``dim``.
        eps: LayerNorm's epsilon, a real > 0.
        elementwise_affine: learnable ``gamma`` and ``beta``.

    Examples:
        >>> norm = QKNorm(8, 2)
        >>> y = norm(torch.randn(3, 8))
        >>> y.view(3, 2, 4).mean(-1).abs().max() < 1e-6
        tensor(True)
    """

    def __init__(self, dim: int, heads: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__()
        dim = validation.as_int("dim", dim, minimum=1)
        heads = validation.as_int("heads", heads, minimum=1)
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
        eps = validation.as_real("eps", eps, low=0.0, low_open=True)
        elementwise_affine = validation.as_bool("elementwise_affine", elementwise_affine)
        self.heads = heads
        self.head_dim = dim // heads
        self.norm = nn.LayerNorm(self.head_dim, eps=eps, elementwise_affine=elementwise_affine,
                                 device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        gamma = self.norm.weight
        if gamma is not None:
            validation.check_device("x", x, gamma.device, "the norm's parameters")
            # what layer_norm takes: its parameters' dtype, or float16/bfloat16 against float32 parameters
            if x.dtype != gamma.dtype and not (gamma.dtype == torch.float32 and x.dtype in (torch.float16,
                                                                                          torch.bfloat16)):
                raise TypeError(f"x must have the norm's dtype {gamma.dtype}"
                                f"{' (or float16/bfloat16)' if gamma.dtype == torch.float32 else ''}, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.heads * self.head_dim:
            raise ValueError(f"x must have last dimension heads * head_dim = {self.heads} * {self.head_dim}, got "
                             f"shape {tuple(x.shape)}")
        shape = x.shape
        return self.norm(x.reshape(*shape[:-1], self.heads, self.head_dim)).reshape(shape)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"


def _check_qkv(mha: nn.MultiheadAttention, query, key, value) -> bool:
    """torch.nn's shape rules for ``query``/``key``/``value``, as ValueError/TypeError naming the argument;
    returns whether the call is batched."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    layout = "(N, L, E)" if mha.batch_first else "(L, N, E)"
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 2-D (L, E) (unbatched) or 3-D {layout} (batch_first={mha.batch_first}), "
                         f"got shape {tuple(query.shape)}")
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"key and value must be {query.dim()}-D like query, got shapes {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape[-1] != mha.embed_dim:
            raise ValueError(f"{name} must have last dimension embed_dim={mha.embed_dim}, got shape {tuple(t.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    batched = query.dim() == 3
    if batched:
        n = 0 if mha.batch_first else 1
        if key.shape[n] != query.shape[n]:
            raise ValueError(f"key must have the batch size N={query.shape[n]} of query (dimension {n} with "
                             f"batch_first={mha.batch_first}), got shape {tuple(key.shape)}")
    dtype, device = mha.in_proj_weight.dtype, mha.in_proj_weight.device
    for name, t in (("query", query), ("key", key), ("value", value)):
        validation.check_device(name, t, device, "the module's parameters")
    autocast = torch.is_autocast_enabled(device.type)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if autocast:  # autocast casts every floating tensor but float64: they meet unless one side is float64
            ok = (t.dtype == torch.float64) == (dtype == torch.float64)
            accepted = f"{'float64' if dtype == torch.float64 else 'a floating dtype other than float64'} " \
                       f"(under torch.autocast, with a {dtype} module)"
        else:
            ok, accepted = t.dtype == dtype, f"the module's dtype {dtype} (or run under torch.autocast)"
        if not ok:
            raise TypeError(f"{name} must have {accepted}, got {t.dtype}")
    return batched


def _check_mask(name: str, mask, shapes: Sequence[Tuple[str, Tuple[int, ...]]], device: torch.device) -> None:
    """``mask`` is None, or a bool or floating tensor of one of ``shapes`` ((what, shape) pairs) on ``device``
    (the query's)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be None or a bool or floating tensor, got {type(mask).__name__}")
    validation.check_device(name, mask, device, "query")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool tensor (True: not attended) or a floating tensor (added to the "
                        f"attention logits), got dtype {mask.dtype}")
    if all(tuple(mask.shape) != shape for _, shape in shapes):
        accepted = " or ".join(f"{what} = {shape}" for what, shape in shapes)
        raise ValueError(f"{name} must have shape {accepted}, got {tuple(mask.shape)}")


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch.nn's convention: a bool mask is True where attention is not allowed; a float mask is added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _merged_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool, b: int, h: int,
                 tq: int, tk: int, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
    """One additive float mask, broadcastable to ``(b, h, tq, tk)`` (or None), from checked masks."""
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        mask = mask.reshape(1, 1, tq, tk) if mask.dim() == 2 else mask.reshape(b, h, tq, tk)  # any strides
    elif causal:  # query i attends keys j <= i (top-left aligned, as scaled_dot_product_attention's is_causal)
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).triu(1)
        mask = _additive(mask, dtype).view(1, 1, tq, tk)
    if key_padding_mask is not None:
        kpm = _additive(key_padding_mask, dtype).reshape(b, 1, 1, tk)
        mask = kpm if mask is None else mask + kpm
    return mask


class QKNormMultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with qk-layernorm: ``softmax(LN(q_h) LN(k_h)^T / sqrt(d_h) + mask) v_h``.

    Made by [`add_qk_norm`][admin_torch.add_qk_norm] from an existing ``nn.MultiheadAttention`` (its parameters are kept;
    ``q_norm`` and ``k_norm`` are added as [`QKNorm`][admin_torch.QKNorm]), or constructed directly with the
    arguments of ``nn.MultiheadAttention`` (``add_bias_kv``, ``add_zero_attn`` and ``kdim``/``vdim``
    different from ``embed_dim`` are refused). ``forward`` takes the same arguments, accepts the same shapes
    and returns ``(output, weights)`` like the stock module; with ``q_norm``/``k_norm`` replaced by identities
    it computes what ``nn.MultiheadAttention`` computes (tested on every mask form, both layouts, both paths):

    * ``query`` ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``, or ``(L, E)`` unbatched; ``key`` and
      ``value`` the same with ``S`` for ``L``; the module's dtype (under ``torch.autocast`` any floating dtype
      but float64, unless the module is float64); on the module's device, the masks too;
    * ``attn_mask``: ``(L, S)`` or ``(N * num_heads, L, S)`` (unbatched: ``(num_heads, L, S)``), row
      ``n * num_heads + h`` for batch ``n``, head ``h``;
    * ``key_padding_mask``: ``(N, S)`` (unbatched: ``(S,)``);
    * either mask bool (True: not attended) or floating (added to the logits);
    * ``is_causal=True``: a hint that ``attn_mask`` is causal, as in torch; without ``attn_mask`` it applies the
      causal mask itself (query ``i`` attends keys ``j <= i``) where the stock module raises;
    * a query with no key left to attend (every key masked) gets zero weights and output ``out_proj(0)`` on both
      paths, as ``scaled_dot_product_attention`` does (torch's ``need_weights=True`` path gives NaN there);
    * ``weights`` ``(N, L, S)`` averaged over heads, ``(N, num_heads, L, S)`` with
      ``average_attn_weights=False``, None with ``need_weights=False`` (which runs
      ``scaled_dot_product_attention``); in training with dropout, the weights returned are the dropped ones,
      as torch's.

    Any other shape or type (a transposed ``(S, L)`` mask, an ``(S, N)`` padding mask, a 3-D mask of the wrong
    size, an integer mask) raises ValueError/TypeError naming the argument and the shapes it accepts; where
    ``L == S`` or ``N == S`` a transposed mask has an accepted shape and cannot be told apart, as in torch.

    torch.nn's fused inference fast paths read ``in_proj_weight`` directly and would skip the
    LayerNorms; ``_qkv_same_embed_dim`` is set False on this module so that ``TransformerEncoderLayer``
    and ``TransformerEncoder`` never take them (this module's own forward does not read it).

    Examples:
        >>> mha = QKNormMultiheadAttention(16, 2, batch_first=True)
        >>> out, w = mha(torch.randn(2, 3, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16))
        >>> out.shape, w.shape
        (torch.Size([2, 3, 16]), torch.Size([2, 3, 4]))
        >>> mha(torch.randn(2, 3, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16), attn_mask=torch.ones(4, 3))
        Traceback (most recent call last):
        ...
        ValueError: attn_mask must have shape (L, S) = (3, 4) or (N * num_heads, L, S) = (4, 3, 4), got (4, 3)
    """

    q_norm: QKNorm
    k_norm: QKNorm

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None, *, eps: float = 1e-5):
        # torch.nn checks these late or not at all (an AssertionError, or a silently accepted bool / string)
        embed_dim = validation.as_int("embed_dim", embed_dim, minimum=1)
        num_heads = validation.as_int("num_heads", num_heads, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        dropout = validation.as_real("dropout", dropout, low=0.0, high=1.0)
        bias, batch_first = validation.as_bool("bias", bias), validation.as_bool("batch_first", batch_first)
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
                         batch_first, device, dtype)
        _check_supported("attention", self)
        _add_norms(self, eps)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        # every check first (shapes and types only: no tensor data is read)
        need_weights = validation.as_bool("need_weights", need_weights)
        average_attn_weights = validation.as_bool("average_attn_weights", average_attn_weights)
        is_causal = validation.as_bool("is_causal", is_causal)
        batched = _check_qkv(self, query, key, value)
        h, dh = self.num_heads, self.head_dim
        if batched:
            b, tq, tk = (query.shape[0], query.shape[1], key.shape[1]) if self.batch_first else \
                (query.shape[1], query.shape[0], key.shape[0])
            _check_mask("key_padding_mask", key_padding_mask, [("(N, S)", (b, tk))], query.device)
            _check_mask("attn_mask", attn_mask, [("(L, S)", (tq, tk)), ("(N * num_heads, L, S)", (b * h, tq, tk))],
                        query.device)
        else:
            b, tq, tk = 1, query.shape[0], key.shape[0]
            _check_mask("key_padding_mask", key_padding_mask, [("(S,)", (tk,))], query.device)
            _check_mask("attn_mask", attn_mask, [("(L, S)", (tq, tk)), ("(num_heads, L, S)", (h, tq, tk))],
                        query.device)

        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # time-first from here: (t, b, e)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self.q_norm(F.linear(query, w_q, b_q))
        k = self.k_norm(F.linear(key, w_k, b_k))
        v = F.linear(value, w_v, b_v)

        def heads(t: Tensor, length: int) -> Tensor:  # (t, b, e) -> (b, h, t, dh)
            return t.reshape(length, b, h, dh).permute(1, 2, 0, 3)

        q, k, v = heads(q, tq), heads(k, tk), heads(v, tk)
        p = self.dropout if self.training else 0.0
        sdpa_causal = is_causal and attn_mask is None and key_padding_mask is None and not need_weights
        mask = None if sdpa_causal else _merged_mask(attn_mask, key_padding_mask, is_causal, b, h, tq, tk,
                                                     q.dtype, q.device)
        dead = None
        if mask is not None:
            # a query with every key masked attends nothing: zero weights and output, on both paths and every
            # kernel (torch's weights path gives NaN there); unmasking its row first keeps forward and backward
            # free of NaN. No data-dependent branch: no host-device sync.
            dead = torch.isneginf(mask).all(-1, keepdim=True)
            mask = mask.masked_fill(dead, 0.0)
        if need_weights:
            weights = ((q * math.sqrt(1.0 / dh)) @ k.transpose(-1, -2) + (0.0 if mask is None else mask)).softmax(-1)
            if dead is not None:
                weights = weights.masked_fill(dead, 0.0)
            if p > 0.0:
                weights = F.dropout(weights, p)  # torch returns the dropped weights too
            y = weights @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=sdpa_causal)
            if dead is not None:
                y = y.masked_fill(dead, 0.0)
        y = self.out_proj(y.permute(2, 0, 1, 3).reshape(tq, b, self.embed_dim))  # (tq, b, e)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if not batched:
            y = y.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            y = y.transpose(0, 1)
        return y, weights


class QKNormLinear(nn.Linear):
    """A query or key projection followed by its per-head LayerNorm: ``qk_norm(x W^T + b)``.

    For attention modules that call their ``q_proj`` / ``k_proj`` (fairseq's ``MultiheadAttention``): the
    projection stays an ``nn.Linear`` (``weight`` / ``bias`` as before, what folding and DeepNorm read),
    its output is normalised per head by ``self.qk_norm`` ([`QKNorm`][admin_torch.QKNorm]). Made in place by
    [`qk_norm_projections_`][admin_torch.qk_norm_projections_].

    Examples:
        >>> proj = qk_norm_projections_(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), heads=2)[0]
        >>> proj(torch.randn(3, 8)).view(3, 2, 4).mean(-1).abs().max() < 1e-5
        tensor(True)
    """

    qk_norm: QKNorm

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 heads: int = 1, eps: float = 1e-5) -> None:
        """A new projection with its own [`QKNorm`][admin_torch.QKNorm] over ``heads`` heads (``heads`` must divide
        ``out_features``); `qk_norm_projections_` turns an existing ``nn.Linear`` into one instead."""
        in_features = validation.as_int("in_features", in_features, minimum=1)
        out_features = validation.as_int("out_features", out_features, minimum=1)
        heads = validation.as_int("heads", heads, minimum=1)
        if out_features % heads:
            raise ValueError(f"heads must divide out_features, got out_features={out_features} and heads={heads}")
        eps = validation.as_real("eps", eps, low=0.0, low_open=True)
        super().__init__(in_features, out_features, validation.as_bool("bias", bias), device, dtype)
        self.qk_norm = QKNorm(out_features, heads, eps=eps, device=self.weight.device, dtype=self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.qk_norm(F.linear(x, self.weight, self.bias))


def qk_norm_projections_(q_proj: nn.Linear, k_proj: nn.Linear, heads: int, eps: float = 1e-5):
    """Turn the query and key projections of one attention module into [`QKNormLinear`][admin_torch.QKNormLinear], in place.

    Returns ``(q_proj, k_proj)``. Raises TypeError/ValueError (nothing changed) for a projection that is
    not an ``nn.Linear``, is one already, or whose width ``heads`` does not divide.
    """
    heads = validation.as_int("heads", heads, minimum=1)
    eps = validation.as_real("eps", eps, low=0.0, low_open=True)
    for name, proj in (("q_proj", q_proj), ("k_proj", k_proj)):
        if not isinstance(proj, nn.Linear):
            raise TypeError(f"{name} must be an nn.Linear, got {type(proj).__name__}")
        if isinstance(proj, QKNormLinear):
            raise ValueError(f"{name} already has qk-layernorm")
        if proj.out_features % heads:
            raise ValueError(f"heads must divide {name}.out_features, got {proj.out_features} and heads={heads}")
    for proj in (q_proj, k_proj):
        proj.__class__ = QKNormLinear
        proj.qk_norm = QKNorm(proj.out_features, heads, eps=eps, device=proj.weight.device, dtype=proj.weight.dtype)
    return q_proj, k_proj


def _check_supported(name: str, mha: nn.MultiheadAttention) -> None:
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(f"{name}: add_bias_kv / add_zero_attn attention is not supported by qk-layernorm")
    if mha.in_proj_weight is None:
        raise ValueError(f"{name}: attention with kdim/vdim different from embed_dim is not supported by "
                         "qk-layernorm")


def _add_norms(module: nn.Module, eps: float = 1e-5) -> None:
    dim = module.embed_dim if isinstance(module, nn.MultiheadAttention) else module.q_proj.out_features
    heads = module.num_heads if isinstance(module, nn.MultiheadAttention) else module.heads
    ref = next(module.parameters())
    module.q_norm = QKNorm(dim, heads, eps=eps, device=ref.device, dtype=ref.dtype)
    module.k_norm = QKNorm(dim, heads, eps=eps, device=ref.device, dtype=ref.dtype)
    if isinstance(module, nn.MultiheadAttention):
        module._qkv_same_embed_dim = False  # keeps torch.nn's fused fast paths (which skip q/k norms) off


def has_qk_norm(module: nn.Module) -> bool:
    """Whether ``module`` (an attention module) applies qk-layernorm (``q_norm`` and ``k_norm``, or
    [`QKNormLinear`][admin_torch.QKNormLinear] projections)."""
    if not isinstance(module, nn.Module):  # a None or a string is no module: not a silent False
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(getattr(module, "q_proj", None), QKNormLinear):
        return True
    return isinstance(getattr(module, "q_norm", None), nn.Module) and isinstance(getattr(module, "k_norm", None),
                                                                                 nn.Module)


def add_qk_norm(model: nn.Module, *, eps: float = 1e-5) -> nn.Module:
    """Give every attention module of ``model`` qk-layernorm, in place; returns ``model``.

    Handled: ``torch.nn.MultiheadAttention`` (self- and cross-attention of torch.nn's encoder/decoder
    layers, Pre-LN or Post-LN, Admin-converted or not; the module becomes a
    [`QKNormMultiheadAttention`][admin_torch.QKNormMultiheadAttention] with the same parameters) and the reference stacks'
    `SelfAttention`, or any attention module whose class says ``supports_qk_norm = True``: it applies its
    ``q_norm`` / ``k_norm`` once they are set and has ``q_proj`` (an ``nn.Linear``) and ``heads``. Attention
    modules that already have it are left as they are. For fairseq models use ``--qk-norm`` (``fairseq_plugins``).

    Args:
        model: a module (the model or one layer).
        eps: the LayerNorms' epsilon.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no attention module without qk-layernorm was found, or one is of an unsupported form
            (``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim`` != ``embed_dim``). Nothing is changed then.

    Examples:
        >>> from admin_torch import make_stack
        >>> stack = add_qk_norm(make_stack('pre_ln', depth=2, dim=16, heads=2, seed=0))
        >>> stack.sublayers[0].q_norm.heads, stack.sublayers[0].q_norm.head_dim
        (2, 8)
    """
    eps = validation.as_real("eps", eps, low=0.0, low_open=True)
    todo = plan_qk_norm(model)
    for module in todo:  # every check passed: now change the model
        if isinstance(module, nn.MultiheadAttention):
            module.__class__ = QKNormMultiheadAttention
        _add_norms(module, eps)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return model


def plan_qk_norm(model: nn.Module) -> list:
    """The attention modules [`add_qk_norm`][admin_torch.add_qk_norm] changes; TypeError/ValueError (nothing changed) if none
    or one is unsupported. [`admin_torch.convert`][admin_torch.convert] calls it before changing anything."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    todo = []
    for name, module in model.named_modules():
        if has_qk_norm(module):
            continue
        if isinstance(module, nn.MultiheadAttention):
            _check_supported(name or "model", module)
            todo.append(module)
        elif getattr(type(module), "supports_qk_norm", False) is True:
            todo.append(module)
    if not todo:
        raise ValueError("model has no attention module without qk-layernorm (torch.nn MultiheadAttention, "
                         "admin_torch's reference-stack SelfAttention); nothing was changed")
    return todo
