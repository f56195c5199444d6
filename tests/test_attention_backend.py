"""The sdpa fast path's attention function against SDPA with pact's explicit 4-D mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pact.attention_backend import pact_sdpa_attention_forward
from pact.ops.attention import build_attention_mask


class _Attn(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _case(dtype, B=2, H=4, H_kv=2, T=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g).to(dtype)
    k = torch.randn(B, H_kv, T, d, generator=g).to(dtype)
    v = torch.randn(B, H_kv, T, d, generator=g).to(dtype)
    bias = torch.rand(B, T, generator=g).mul(3).floor().add(1).log()  # log(size), sizes 1..3
    bias[1, :3] = float("-inf")  # left padding of sample 1
    return q, k, v, bias


def _reference(q, k, v, bias, q_len):
    groups = q.shape[1] // k.shape[1]
    mask = build_attention_mask(bias, q_len, torch.float32)
    k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_prefill_and_decode_equal_mask_path(dtype, atol):
    q, k, v, bias = _case(dtype)
    mod = _Attn(groups=2)
    scale = q.shape[-1] ** -0.5
    out, _ = pact_sdpa_attention_forward(mod, q, k, v, None, scaling=scale, pact_key_bias=bias)
    ref = _reference(q, k, v, bias, q.shape[2])
    assert out.shape == ref.shape and torch.isfinite(out).all()
    real = torch.ones(2, q.shape[2], dtype=torch.bool)
    real[1, :3] = False  # padding query rows differ (uniform over padding instead of the diagonal)
    assert torch.allclose(out.float()[real], ref[real], atol=atol)
    # decode: one query against every cached key, no causal mask
    out1, _ = pact_sdpa_attention_forward(mod, q[:, :, -1:], k, v, None, scaling=scale, pact_key_bias=bias)
    ref1 = _reference(q[:, :, -1:], k, v, bias, 1)
    assert torch.allclose(out1.float(), ref1, atol=atol)


def test_without_key_bias_is_stock_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, _ = _case(torch.float32)
    mod = _Attn(groups=2)
    mask = torch.zeros(2, 1, q.shape[2], q.shape[2])
    for m in (None, mask):
        a, _ = pact_sdpa_attention_forward(mod, q, k, v, m, scaling=0.3)
        b, _ = sdpa_attention_forward(mod, q, k, v, m, scaling=0.3)
        assert torch.equal(a, b)


def test_rejects_unaligned_queries():
    q, k, v, bias = _case(torch.float32)
    with pytest.raises(RuntimeError, match="q_len"):
        pact_sdpa_attention_forward(_Attn(2), q[:, :, -3:], k, v, None, pact_key_bias=bias)
