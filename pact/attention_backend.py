"""A causal fast path for SDPA with a per-key additive bias (proportional attention, padding).

From the reduction layer on, every key j carries a bias b_j added to its logit from every query
(log(size) of a merged token, a large negative number for a padding slot). An explicit 4-D float
mask would carry it, but SDPA given a mask loses its causal kernels (on CPU the mask path of a
3095-token bf16 prefill layer takes ~3x the ``is_causal=True`` time). Instead the bias rides in one
extra query/key column:

    scale * [q, 1, 0...] . [k, b_j / scale, 0...] = scale * q.k + b_j

so SDPA runs with ``is_causal=True`` (prefill, q_len == kv_len: top-left and bottom-right causal
alignment coincide) or without any mask (a single decode query sees every cached key), with the
explicit ``scale`` of the original head dim. V is zero-padded to the same width (CPU SDPA falls back
to its slow math kernel when the value head dim differs from the query's) and the padding columns
are dropped from the output. On CUDA the same call is eligible for the flash / memory-efficient
kernels (no mask, equal head dims <= 256, multiple of 8; d = 256 would give 272, beyond flash).

The engine uses it for prefills (q_len == kv_len). Decode steps keep their explicit (B, 1, 1, K)
mask, which has no causal part and so costs SDPA nothing, whereas the extra column would mean
copying the layer's whole K/V cache at every step; the function still accepts q_len == 1.

The engine selects this per model instance by switching the text config's ``_attn_implementation``
to ``PACT_SDPA`` (``switch_to_fast`` / ``switch_back``) and passing the bias as the keyword
``pact_key_bias`` through the decoder layer (which forwards ``**kwargs`` to its attention module,
which forwards them to the attention function). A call without that keyword -- layers before the
reduction, text-only prompts, the vision tower of a model whose configs are shared -- goes to the
stock ``sdpa_attention_forward`` unchanged, so those layers stay bit-identical to stock.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

PACT_SDPA = "pact_sdpa"
"""Name of the attention implementation registered in transformers' interfaces."""

# Logit given to a padding key: exp(-1e4) is exactly 0 in float32, yet finite, so a padding query
# (which sees only padding keys) gets a uniform, finite softmax instead of NaN.
_PAD_LOGIT = -1.0e4


def bias_column(key_bias: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The extra key column that carries ``key_bias`` once multiplied by ``scale``.

    Args:
        key_bias: (B, K) float, per key 0 / log(size) / -inf (padding).
        scale: the softmax scale of the attention (1/sqrt(head_dim) for the usual models).
        dtype: dtype of the keys.
    Returns:
        (B, K) in ``dtype``: key_bias / scale, padding keys at a large finite negative value that
        survives the cast (fp16's range is only 65504, so there the logit is about -max/16 * scale).
    """
    pad = max(_PAD_LOGIT / scale, -torch.finfo(dtype).max / 16)
    col = torch.where(torch.isneginf(key_bias), pad, key_bias.float() / scale)
    return col.to(dtype)


def _pad_width(width: int) -> int:
    """Next multiple of 16 (SDPA kernels want multiples of 8; on this CPU 80 ran a little faster
    than 72 for head 64 + 1, within noise)."""
    return -(-width // 16) * 16


def pact_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    pact_key_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA with pact's per-key bias folded into an extra q/k column (see the module docstring).

    Args:
        query: (B, H, q, d); key: (B, H_kv, K, d); value: (B, H_kv, K, d_v) (after the cache update).
        attention_mask: ignored on the fast path (the engine passes None there).
        pact_key_bias: (B, K) float32 key bias (0 / log(size) / -inf for padding), or None: then
            this is exactly the stock ``sdpa_attention_forward``.
    Returns:
        ((B, q, H, d_v) attention output, None), as the stock function.
    """
    if pact_key_bias is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    B, _, q_len, d = query.shape
    kv_len, d_v = key.shape[2], value.shape[-1]
    if tuple(pact_key_bias.shape) != (B, kv_len) or q_len not in (1, kv_len):
        raise RuntimeError(
            f"pact fast attention: key bias {tuple(pact_key_bias.shape)} for q_len={q_len}, kv_len={kv_len} "
            "(needs (B, kv_len) and q_len in (1, kv_len))"
        )
    scale = float(scaling) if scaling is not None else d**-0.5
    width = _pad_width(max(d + 1, d_v))
    # One zero-filled buffer per tensor and one copy each (cat + pad would copy twice).
    q_aug = query.new_zeros(*query.shape[:-1], width)
    q_aug[..., :d] = query
    q_aug[..., d] = 1.0
    k_aug = key.new_zeros(*key.shape[:-1], width)
    k_aug[..., :d] = key
    k_aug[..., d] = bias_column(pact_key_bias.to(key.device), scale, key.dtype)[:, None, :]  # (B, 1, K)
    v_aug = F.pad(value, (0, width - d_v))
    out, _ = sdpa_attention_forward(
        module, q_aug, k_aug, v_aug, None, dropout=dropout, scaling=scale, is_causal=True, **kwargs
    )
    # q_len == 1: the stock function turns is_causal off (the query sees every cached key).
    return out[..., :d_v], None


def register() -> None:
    """Make ``PACT_SDPA`` a known attention implementation (idempotent). The mask machinery looks
    masks up by the same name: it gets the stock SDPA mask, so layers before the reduction see
    exactly the stock masks."""
    AttentionInterface.register(PACT_SDPA, pact_sdpa_attention_forward)
    if PACT_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(PACT_SDPA, sdpa_mask)


def attention_configs(adapter: Any) -> list[Any]:
    """The distinct config objects the text model and its attention modules read
    ``_attn_implementation`` from (normally one: the text config)."""
    seen: dict[int, Any] = {}
    # hybrid decoders: linear-attention layers have no self_attn (and no attention function)
    for obj in [adapter.text_model, *(getattr(layer, "self_attn", None) for layer in adapter.layers)]:
        cfg = getattr(obj, "config", None)
        if cfg is not None:
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _set_impl(cfg: Any, name: str) -> None:
    # The dict form sets this config only, not its sub-configs (e.g. a vision config).
    cfg._attn_implementation = {"": name}


def switch_to_fast(adapter: Any) -> list[Any]:
    """Point the text model's configs from "sdpa" to ``PACT_SDPA``; return the configs switched."""
    register()
    switched = [c for c in attention_configs(adapter) if getattr(c, "_attn_implementation", None) == "sdpa"]
    for cfg in switched:
        _set_impl(cfg, PACT_SDPA)
    return switched


def switch_back(configs: list[Any]) -> None:
    """Undo ``switch_to_fast`` (configs someone else changed meanwhile are left alone)."""
    for cfg in configs:
        if getattr(cfg, "_attn_implementation", None) == PACT_SDPA:
            _set_impl(cfg, "sdpa")


__all__ = [
    "PACT_SDPA",
    "attention_configs",
    "bias_column",
    "pact_sdpa_attention_forward",
    "register",
    "switch_back",
    "switch_to_fast",
]
