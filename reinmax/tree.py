"""A latent-tree encoder whose structure is a sequence of discrete merge choices.

[`LatentTreeLSTM`][reinmax.LatentTreeLSTM] is the Gumbel Tree-LSTM of Choi, Yoo & Lee (AAAI 2018) with the choice
estimator picked by name from `reinmax.ESTIMATORS`: starting from one node per token, it
composes every adjacent pair with a binary Tree-LSTM cell, scores the candidates with a learned
query vector, and merges one pair per step until a single root is left. The choice is sampled
through the estimator in training (the one-hot carries the estimator's gradient into the scores)
and is the greedy argmax in evaluation. Batches of unequal lengths are handled with masks: a
padded sequence gives the same root as the sequence alone (in evaluation mode).

[`TreeClassifier`][reinmax.TreeClassifier] puts an embedding in front and an MLP behind it (ListOps: tokens in,
digit out).

Examples:
    >>> import torch
    >>> from reinmax.tree import LatentTreeLSTM
    >>> enc = LatentTreeLSTM(input_dim=16, hidden_dim=32, estimator="reinmax", tau=1.1)
    >>> x = torch.randn(3, 7, 16)                       # (batch, time, input_dim)
    >>> root = enc(x, lengths=torch.tensor([7, 4, 1]))  # (batch, hidden_dim)
    >>> root.shape
    torch.Size([3, 32])
"""

import contextlib
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolbox_core import validation

from ._checks import check_tau
from .registry import check_estimator_name, check_estimator_options, estimate

__all__ = ["BinaryTreeLSTMCell", "LatentTreeLSTM", "TreeClassifier"]


class BinaryTreeLSTMCell(nn.Module):
    """Binary Tree-LSTM composition (Tai et al. 2015): two children ``(h, c)`` -> parent ``(h, c)``.

    ``c = sig(f_l) c_l + sig(f_r) c_r + sig(i) tanh(u)``, ``h = sig(o) tanh(c)``, the gates an affine
    map of ``[h_l; h_r]``. Shapes: every input ``(..., hidden_dim)``, outputs the same.
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        hidden_dim = validation.as_int("hidden_dim", hidden_dim, minimum=1)
        self.hidden_dim = hidden_dim
        self.linear = nn.Linear(2 * hidden_dim, 5 * hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        # forget-gate bias 1 (both children), as in Choi et al.'s implementation
        with torch.no_grad():
            self.linear.bias[self.hidden_dim:3 * self.hidden_dim].fill_(1.0)

    def forward(self, hl: Tensor, cl: Tensor, hr: Tensor, cr: Tensor) -> Tuple[Tensor, Tensor]:
        shape = f"(..., hidden_dim={self.hidden_dim})"
        weight = self.linear.weight
        for name, t in (("hl", hl), ("cl", cl), ("hr", hr), ("cr", cr)):
            validation.check_tensor(name, t, last_dim=self.hidden_dim, shape=shape)
            validation.check_device(name, t, weight.device, "the cell's parameters")
            if t.shape != hl.shape:
                raise ValueError(f"{name} must have the shape of hl {tuple(hl.shape)}, got {tuple(t.shape)}")
        i, fl, fr, u, o = self.linear(torch.cat([hl, hr], dim=-1)).chunk(5, dim=-1)
        c = cl * torch.sigmoid(fl) + cr * torch.sigmoid(fr) + torch.tanh(u) * torch.sigmoid(i)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


def _check_positive_int(name: str, value) -> int:
    return validation.as_int(name, value, minimum=1)


class LatentTreeLSTM(nn.Module):
    """Encode a sequence into one vector by a chain of discrete merge choices (Gumbel Tree-LSTM).

    Args:
        input_dim: size of the token vectors.
        hidden_dim: size of the Tree-LSTM state.
        estimator: name of the choice estimator in `reinmax.ESTIMATORS` (``"reinmax"``,
            ``"straight_through"``, ``"gumbel_softmax"``, ``"gapped_straight_through"``, ``"gumbel_rao"``).
        tau: the estimator's temperature (ReinMax prefers >= 1, Gumbel-Softmax < 1).
        estimator_options: extra keywords for the estimator (``gap=`` or ``k=``).

    Shapes:
        ``forward(x, lengths)``: ``x`` is ``(batch, time, input_dim)``, ``lengths`` ``(batch,)``
        integers in ``[1, time]`` (positions at and after a sequence's length are padding and never
        read); returns the root state ``h`` of shape ``(batch, hidden_dim)``. With
        ``return_merges=True`` it also returns a ``(batch, time - 1)`` long tensor: the index of the
        pair merged at each step (-1 once a sequence is down to its root).

    Training mode samples each choice through the estimator; evaluation mode takes the argmax.
    """

    def __init__(self, input_dim: int, hidden_dim: int, estimator: str = "reinmax", tau: float = 1.0,
                 estimator_options: Optional[Dict] = None):
        super().__init__()
        input_dim = _check_positive_int("input_dim", input_dim)
        hidden_dim = _check_positive_int("hidden_dim", hidden_dim)
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.estimator = check_estimator_name(estimator, "estimator")
        self.tau = check_tau(tau)
        if estimator_options is not None and not isinstance(estimator_options, Mapping):
            raise TypeError(f"estimator_options must be a dict or None, got {type(estimator_options).__name__}")
        self.estimator_options = check_estimator_options(self.estimator, self.tau, estimator_options or {})
        self.leaf = nn.Linear(input_dim, 2 * hidden_dim)
        self.cell = BinaryTreeLSTMCell(hidden_dim)
        self.query = nn.Parameter(torch.empty(hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.leaf.weight)
        nn.init.zeros_(self.leaf.bias)
        self.cell.reset_parameters()
        nn.init.normal_(self.query, mean=0.0, std=0.01)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, "
                f"estimator={self.estimator!r}, tau={self.tau}")

    def _choose(self, logits: Tensor) -> Tensor:
        if self.training:
            y_hard, _ = estimate(self.estimator, logits, self.tau, dim=-1, **self.estimator_options)
            return y_hard
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).to(logits.dtype)

    def forward(self, x: Tensor, lengths: Tensor, return_merges: bool = False):
        validation.check_tensor("x", x, dims=(3,), last_dim=self.input_dim, shape=f"(batch, time, {self.input_dim})")
        validation.check_device("x", x, self.query.device, "the module's parameters")
        if x.dtype != self.query.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the module's dtype {self.query.dtype} (or run under torch.autocast), "
                            f"got {x.dtype}")
        return_merges = validation.as_bool("return_merges", return_merges)
        batch, time, _ = x.shape
        if isinstance(lengths, Tensor) and lengths.is_meta != x.is_meta:
            raise ValueError(f"lengths must be on the device of x ({x.device}) or hold data, got a tensor on "
                             f"{lengths.device}")
        try:
            lengths = torch.as_tensor(lengths, device=x.device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"lengths must be a ({batch},) integer tensor or a sequence of {batch} integers, "
                            f"got {type(lengths).__name__}") from None
        if lengths.shape != (batch,) or lengths.dtype.is_floating_point or lengths.dtype.is_complex \
                or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be a ({batch},) integer tensor, got {tuple(lengths.shape)} {lengths.dtype}")
        # data checks once per forward (not per merge step): the merge logits are then finite by construction
        validation.check_data(lambda: ((lengths < 1) | (lengths > time)).any(),
                              f"lengths must lie in [1, {time}] (the time dimension of x)")
        validation.check_data(lambda: ~torch.isfinite(x).all(), "x must be finite (no NaN or inf)")
        with contextlib.nullcontext() if torch.compiler.is_compiling() else validation.data_checks(False):
            return self._encode(x, lengths, return_merges)

    def _encode(self, x: Tensor, lengths: Tensor, return_merges: bool):
        batch, time, _ = x.shape
        h, c = self.leaf(x).chunk(2, dim=-1)
        active = torch.arange(time, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # (batch, time)
        if not self.training and not torch.is_grad_enabled() and time > 1:
            root, merges = self._greedy_incremental(h, c, active)
            return (root, merges) if return_merges else root
        merges: List[Tensor] = []
        for step in range(time - 1):
            hl, cl, hr, cr = h[:, :-1], c[:, :-1], h[:, 1:], c[:, 1:]
            new_h, new_c = self.cell(hl, cl, hr, cr)  # every adjacent pair: (batch, n, hidden)
            n = time - 1 - step
            # pair j of this step is real iff both nodes are: j + 1 < length - step
            valid = active[:, step + 1:]
            if n > 1:
                first = torch.zeros_like(valid)
                first[:, 0] = True
                # finished sequences have no real pair; give them a dummy one (their result is discarded)
                valid = valid | (first & ~valid.any(dim=1, keepdim=True))
                logits = (new_h * self.query).sum(-1).masked_fill(~valid, float("-inf"))
                select = self._choose(logits).unsqueeze(-1)  # one-hot (batch, n, 1)
                cum = select.cumsum(dim=1)
                left, right = 1.0 - cum, cum - select
                new_h = left * hl + select * new_h + right * hr
                new_c = left * cl + select * new_c + right * cr
                if return_merges:
                    merges.append(select.squeeze(-1).argmax(-1))
            elif return_merges:
                merges.append(torch.zeros(batch, dtype=torch.long, device=x.device))
            going = active[:, step + 1].view(batch, 1, 1)  # still more than one node left
            h = torch.where(going, new_h, h[:, :-1])
            c = torch.where(going, new_c, c[:, :-1])
            if return_merges:
                merges[-1] = merges[-1].masked_fill(~active[:, step + 1], -1)
        root = h[:, 0]
        if return_merges:
            out = torch.stack(merges, dim=1) if merges else torch.zeros(batch, 0, dtype=torch.long, device=x.device)
            return root, out
        return root


    def _greedy_incremental(self, h: Tensor, c: Tensor, active: Tensor) -> Tuple[Tensor, Tensor]:
        """Evaluation without autograd: the same greedy trees, composing only the two new pairs per step.

        The full loop composes all ``n`` adjacent pairs at every step (O(time^2) cell calls); after a
        merge at ``k`` only pairs ``k - 1`` and ``k`` are new, the others are the previous step's
        candidates shifted, so this path costs O(time) cell calls.
        """
        batch, time, hidden = h.shape
        dev = h.device
        rows = torch.arange(batch, device=dev)
        cand_h, cand_c = self.cell(h[:, :-1], c[:, :-1], h[:, 1:], c[:, 1:])  # (batch, time - 1, hidden)
        merges = torch.full((batch, time - 1), -1, dtype=torch.long, device=dev)
        for step in range(time - 1):
            n = time - 1 - step  # candidate pairs now; nodes now: n + 1
            valid = active[:, step + 1:]
            going = active[:, step + 1]
            logits = (cand_h * self.query).sum(-1).masked_fill(~valid, float("-inf"))
            k = torch.where(going, logits.argmax(-1), torch.zeros_like(rows))  # (batch,)
            merges[:, step] = torch.where(going, k, torch.full_like(k, -1))
            # nodes after the merge: j < k -> j, j == k -> the new node, j > k -> j + 1
            pos = torch.arange(n, device=dev).unsqueeze(0)
            src = (pos + (pos > k.unsqueeze(1)).long()).unsqueeze(-1).expand(batch, n, hidden)
            new_h, new_c = h.gather(1, src), c.gather(1, src)
            new_h[rows, k] = cand_h[rows, k]
            new_c[rows, k] = cand_c[rows, k]
            if n > 1:
                # pairs after the merge: j < k - 1 -> j, j > k -> j + 1; pairs k - 1 and k are new
                pos = torch.arange(n - 1, device=dev).unsqueeze(0)
                src = (pos + (pos > k.unsqueeze(1)).long()).unsqueeze(-1).expand(batch, n - 1, hidden)
                nc_h, nc_c = cand_h.gather(1, src), cand_c.gather(1, src)
                left = (k - 1).clamp(min=0)
                right = k.clamp(max=n - 1)  # node right + 1 exists when k < n - 1
                right_next = (k + 1).clamp(max=n - 1)
                lh, lc = self.cell(new_h[rows, left], new_c[rows, left], new_h[rows, k], new_c[rows, k])
                rh, rc = self.cell(new_h[rows, right], new_c[rows, right],
                                   new_h[rows, right_next], new_c[rows, right_next])
                has_left, has_right = (k > 0).unsqueeze(-1), (k < n - 1).unsqueeze(-1)
                left_idx, right_idx = left.clamp(max=n - 2), k.clamp(max=n - 2)
                nc_h[rows, left_idx] = torch.where(has_left, lh, nc_h[rows, left_idx])
                nc_c[rows, left_idx] = torch.where(has_left, lc, nc_c[rows, left_idx])
                nc_h[rows, right_idx] = torch.where(has_right, rh, nc_h[rows, right_idx])
                nc_c[rows, right_idx] = torch.where(has_right, rc, nc_c[rows, right_idx])
                g = going.view(batch, 1, 1)
                cand_h = torch.where(g, nc_h, cand_h[:, :-1])
                cand_c = torch.where(g, nc_c, cand_c[:, :-1])
            g = going.view(batch, 1, 1)
            h = torch.where(g, new_h, h[:, :-1])
            c = torch.where(g, new_c, c[:, :-1])
        return h[:, 0], merges


class TreeClassifier(nn.Module):
    """Token ids -> class scores through [`LatentTreeLSTM`][reinmax.LatentTreeLSTM] (the ListOps model).

    Args:
        vocab_size, num_classes: sizes of the input vocabulary and of the output.
        embed_dim, hidden_dim, mlp_dim: sizes of the embedding, tree state and classifier MLP layer.
        padding_idx: the padding token id (its embedding is zero and never read anyway).
        dropout: dropout on the embedding and in the MLP.
        estimator, tau, estimator_options: see [`LatentTreeLSTM`][reinmax.LatentTreeLSTM].

    Shapes: ``forward(tokens, lengths)``: ``tokens`` ``(batch, time)`` long, right-padded;
    ``lengths`` ``(batch,)``; returns logits ``(batch, num_classes)``.
    """

    def __init__(self, vocab_size: int, num_classes: int = 10, embed_dim: int = 128, hidden_dim: int = 128,
                 mlp_dim: int = 128, padding_idx: Optional[int] = None, dropout: float = 0.0,
                 estimator: str = "reinmax", tau: float = 1.0, estimator_options: Optional[Dict] = None):
        super().__init__()
        vocab_size, num_classes, embed_dim, mlp_dim = (
            _check_positive_int(name, value) for name, value in (
                ("vocab_size", vocab_size), ("num_classes", num_classes), ("embed_dim", embed_dim),
                ("mlp_dim", mlp_dim)))
        dropout = validation.as_real("dropout", dropout, low=0.0, high=1.0, high_open=True)
        if padding_idx is not None:
            padding_idx = validation.as_int("padding_idx", padding_idx, minimum=-vocab_size, maximum=vocab_size - 1)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.encoder = LatentTreeLSTM(embed_dim, hidden_dim, estimator, tau, estimator_options)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Linear(hidden_dim, mlp_dim)
        self.out = nn.Linear(mlp_dim, num_classes)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        validation.check_tensor("tokens", tokens, floating=False, dims=(2,), shape="(batch, time)")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64 or int32 tensor of token ids, got dtype {tokens.dtype}")
        validation.check_device("tokens", tokens, self.embed.weight.device, "the module's parameters")
        vocab = self.embed.num_embeddings
        validation.check_data(lambda: ((tokens < 0) | (tokens >= vocab)).any(),
                              f"tokens must be token ids in [0, {vocab - 1}] (vocab_size={vocab})")
        root = self.encoder(self.dropout(self.embed(tokens)), lengths)
        hidden = self.dropout(F.relu(self.mlp(self.dropout(root))))
        return self.out(hidden)
