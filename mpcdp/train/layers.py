"""Layers that per-sample gradient clipping by book-keeping can see into.

:class:`torch.nn.MultiheadAttention` computes its projections with ``F.linear`` on its own
``in_proj_weight`` and on ``out_proj.weight`` directly (``out_proj``'s ``forward`` is never
called), so forward hooks on its sub-modules never fire and
:class:`mpcdp.train.clipping.PerSampleClipper` cannot attribute those weights' gradients to
examples. :class:`DPMultiheadAttention` computes the same function from four ordinary
:class:`torch.nn.Linear` projections (q, k, v, out) and
:func:`torch.nn.functional.scaled_dot_product_attention`, so every weight it owns sits in a
layer the clipper handles with ghost norms. :func:`replace_multihead_attention` swaps the
attention modules of an existing model for it, copying the weights, so the model computes
the same outputs as before.

Only batch-first inputs ``(batch, sequence, feature)`` are supported: per-sample gradients
need the batch on dimension 0 of every layer input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpcdp.errors import ParameterError, UnsupportedModuleError

__all__ = ["DPMultiheadAttention", "replace_multihead_attention"]


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = do not attend) or a float mask as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


class DPMultiheadAttention(nn.Module):
    """Multi-head attention, batch first, built from ``nn.Linear`` projections.

    A drop-in replacement for ``nn.MultiheadAttention(embed_dim, num_heads, dropout, bias,
    kdim=kdim, vdim=vdim, batch_first=True)`` that computes the same function (``add_bias_kv``
    and ``add_zero_attn`` are not supported). The projections are the sub-modules ``q_proj``,
    ``k_proj``, ``v_proj`` and ``out_proj``. ``in_proj_weight`` and ``in_proj_bias`` are
    read-only copies of the concatenated q, k, v projections (not parameters), for code that
    reads them. ``nn.TransformerEncoderLayer`` with it never takes torch's fused inference
    fast path (which needs ``nn.MultiheadAttention`` itself); its results are unchanged.
    """

    batch_first: bool = True

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0:
            raise ParameterError("embed_dim", embed_dim, "must be a positive integer")
        if num_heads <= 0 or embed_dim % num_heads != 0:
            raise ParameterError(
                "num_heads", num_heads, f"must be positive and divide embed_dim={embed_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ParameterError("dropout", dropout, "must be in [0, 1)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        # Always False: torch's fused inference paths (nn.TransformerEncoderLayer in eval
        # mode) test this flag and would otherwise call MultiheadAttention internals.
        self._qkv_same_embed_dim = False
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        # a module, not F.dropout: per-sample clipping's first-use check switches nn.Dropout
        # off to compare outputs across batch sizes, and refuses any other randomness
        self.attn_dropout = nn.Dropout(dropout)

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """The q, k, v weights stacked as ``nn.MultiheadAttention`` stores them (a copy)."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The q, k, v biases stacked (a copy), or None without biases."""
        biases = [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]
        if any(b is None for b in biases):
            return None
        return torch.cat([b for b in biases if b is not None])

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` (B, L, E) over ``key`` (B, S, kdim) / ``value`` (B, S, vdim).

        Masks follow ``nn.MultiheadAttention``: a boolean ``attn_mask`` ((L, S) or
        (B * num_heads, L, S)) or ``key_padding_mask`` ((B, S)) is True where attention is
        NOT allowed; float masks are added to the attention scores. ``is_causal`` without
        ``attn_mask`` applies a causal mask. Returns ``(output, weights)`` where ``weights``
        is None unless ``need_weights`` (then averaged over heads if
        ``average_attn_weights``), as ``nn.MultiheadAttention`` does.
        """
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ParameterError(
                "query",
                tuple(query.shape),
                "DPMultiheadAttention takes batched, batch-first inputs (B, L, E)",
            )
        bsz, tgt_len, _ = query.shape
        src_len = key.shape[1]
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))
        dropout_p = self.dropout if self.training else 0.0

        use_causal_flag = is_causal and attn_mask is None and key_padding_mask is None
        if is_causal and attn_mask is None and not use_causal_flag:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).triu(1)
        mask: torch.Tensor | None = None
        if attn_mask is not None:
            am = _additive_mask(attn_mask, q.dtype)
            if am.dim() == 2:
                am = am.view(1, 1, tgt_len, src_len)
            else:
                am = am.view(bsz, self.num_heads, tgt_len, src_len)
            mask = am
        if key_padding_mask is not None:
            kpm = _additive_mask(key_padding_mask, q.dtype).view(bsz, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm

        weights: torch.Tensor | None = None
        if need_weights or dropout_p > 0.0:
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if use_causal_flag:
                causal = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            if mask is not None:
                scores = scores + mask
            attn = self.attn_dropout(torch.softmax(scores, dim=-1))
            out = torch.matmul(attn, v)
            if need_weights:
                weights = attn.mean(dim=1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=use_causal_flag
            )
        out = out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        return self.out_proj(out), weights


def _from_torch_mha(mha: nn.MultiheadAttention, path: str) -> DPMultiheadAttention:
    where = f"module {path!r}" if path else "the module"
    if not mha.batch_first:
        raise UnsupportedModuleError(
            path,
            f"{where} is nn.MultiheadAttention with batch_first=False; per-sample "
            "clipping needs batch-first layers: construct it with batch_first=True",
        )
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise UnsupportedModuleError(
            path,
            f"{where} uses add_bias_kv or add_zero_attn, which DPMultiheadAttention "
            "does not support",
        )
    ref = mha.out_proj.weight
    has_bias = mha.in_proj_bias is not None
    new = DPMultiheadAttention(
        mha.embed_dim,
        mha.num_heads,
        mha.dropout,
        has_bias,
        kdim=mha.kdim,
        vdim=mha.vdim,
        device=ref.device,
        dtype=ref.dtype,
    )
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            assert mha.in_proj_weight is not None
            wq, wk, wv = mha.in_proj_weight.chunk(3)
            grad_flags = [mha.in_proj_weight.requires_grad] * 3
        else:
            assert mha.q_proj_weight is not None
            assert mha.k_proj_weight is not None
            assert mha.v_proj_weight is not None
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            grad_flags = [w.requires_grad for w in (wq, wk, wv)]
        projections = [new.q_proj, new.k_proj, new.v_proj]
        for proj, w, flag in zip(projections, (wq, wk, wv), grad_flags, strict=True):
            proj.weight.copy_(w)
            proj.weight.requires_grad_(flag)
        if mha.in_proj_bias is not None:
            for proj, b in zip(projections, mha.in_proj_bias.chunk(3), strict=True):
                assert proj.bias is not None
                proj.bias.copy_(b)
                proj.bias.requires_grad_(mha.in_proj_bias.requires_grad)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        new.out_proj.weight.requires_grad_(mha.out_proj.weight.requires_grad)
        if mha.out_proj.bias is not None and new.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
            new.out_proj.bias.requires_grad_(mha.out_proj.bias.requires_grad)
    new.train(mha.training)
    return new


def replace_multihead_attention(module: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``module`` by a :class:`DPMultiheadAttention`.

    Weights, ``requires_grad`` flags, device, dtype and train/eval mode are copied, so the
    model computes the same function. The replacement happens in place on ``module``'s
    sub-modules; the return value is ``module`` itself, or the new attention module when
    ``module`` is itself an ``nn.MultiheadAttention``. Raises
    :class:`~mpcdp.errors.ParameterError` naming the module for attention modules with
    ``batch_first=False``, ``add_bias_kv=True`` or ``add_zero_attn=True``.
    """
    if isinstance(module, nn.MultiheadAttention):
        return _from_torch_mha(module, "")
    replaced: dict[int, DPMultiheadAttention] = {}
    for path, parent in list(module.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, nn.MultiheadAttention):
                if id(child) not in replaced:
                    child_path = f"{path}.{attr}" if path else attr
                    replaced[id(child)] = _from_torch_mha(child, child_path)
                setattr(parent, attr, replaced[id(child)])
    return module
