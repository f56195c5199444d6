"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``, natively multimodal): a hybrid decoder.

Its decoder layers are of two kinds (``text_config.layer_types``; real checkpoints: three
``linear_attention`` layers for every ``full_attention`` layer):

- full attention (``layer.self_attn``): softmax attention with an output gate (``q_proj`` emits
  each head's query and its gate side by side), per-head q/k RMS norms and interleaved M-RoPE on
  the first ``partial_rotary_factor`` of each head (the rest passes through);
- linear attention (``layer.linear_attn``, Gated DeltaNet): a short causal depthwise convolution over
  the q/k/v projections, then a gated delta-rule recurrence. No positions, no softmax, no KV cache:
  its cache is a per-sequence conv state and recurrent state (``past_key_values`` layers of type
  ``LinearAttentionLayer``), and its only mask is a 2-D padding mask that zeroes padded rows before
  the convolution.

What the engine needs from this adapter (``ModelAdapter.linear_attention_layers``): which layers are
linear, so that layers >= L of that kind get the reduced layout's 2-D padding mask instead of the
4-D mask / key bias (proportional attention acts in the full-attention layers only), and which
layer's cache length ``DynamicCache.get_seq_length()`` reports (the first full-attention layer).

Queries and keys (``queries_keys``): on a full-attention layer, what its attention function
receives (the gate half of ``q_proj`` dropped); on a linear layer, the Gated DeltaNet's own query
and key of each token (convolution, SiLU, per-head L2 norm: what the recurrence reads and writes),
with no RoPE (the layer has none). docs/CONFIGDOC.md ("Qwen3.5") says what that means for EUTI,
DBDPC and the other key-based methods, and why L at a full-attention layer is the recommended use.

Positions are Qwen3-VL's: (t, h, w) M-RoPE ids (the text model also gets a text row, dropped by
``normalize_positions``), a video frame is its own vision run after a timestamp (``run_media``
finds which runs form one video, as for Qwen3-VL). No DeepStack.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pact.models.base import KNOWN_ATTENTION_CHILDREN, refuse_unknown_children
from pact.models.qwen2_vl import Qwen2VLAdapter, QwenProbe
from pact.models.qwen3_vl import timestamped_video_media

LINEAR_ATTENTION_CHILDREN = frozenset(
    {"conv1d", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "norm", "out_proj"}
)
"""Sub-modules of a Gated DeltaNet layer that ``Qwen3_5Adapter.queries_keys`` models (it reads
``in_proj_qkv`` and ``conv1d``; the others act after the recurrence). Anything else is refused."""


class Qwen3_5Adapter(Qwen2VLAdapter):  # noqa: N801 (mirrors the Hugging Face class name)
    family = "qwen3_5"
    class_names = ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model")
    model_types = ("qwen3_5",)
    default_checkpoint = "Qwen/Qwen3.5-27B"
    vision_probe_class = QwenProbe  # same ViT interface: fused qkv, vision RoPE, 2x2 patch merger

    def run_media(self, inputs: Mapping[str, Any]) -> list[list[int]] | None:
        """A video's frames are timestamped runs, as in Qwen3-VL: ``timestamped_video_media``."""
        return timestamped_video_media(self, inputs)

    def candidate_mask(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Placeholder ids that the processor marked visual in ``mm_token_type_ids`` (1 image, 2
        video). A placeholder id elsewhere (e.g. generated as text and fed back by an uncached
        ``generate``, which extends ``mm_token_type_ids`` with zeros) receives no vision feature and
        is text to the model's M-RoPE positions, so it is no reduction candidate either."""
        mask = super().candidate_mask(input_ids, inputs)
        types = inputs.get("mm_token_type_ids")
        if isinstance(types, torch.Tensor) and types.shape == input_ids.shape:
            mask &= types.to(input_ids.device) != 0
        return mask

    # --- layer kinds ----------------------------------------------------------------------------

    def linear_attention_layers(self) -> frozenset[int]:
        """Indices of the Gated DeltaNet layers (``layer_types == "linear_attention"``)."""
        types = getattr(self.text_config, "layer_types", None) or ()
        return frozenset(i for i, kind in enumerate(types) if kind == "linear_attention")

    def full_attention_layers(self) -> list[int]:
        """Indices of the softmax-attention layers, in order."""
        linear = self.linear_attention_layers()
        return [i for i in range(len(self.layers)) if i not in linear]

    # --- attention geometry ---------------------------------------------------------------------

    def head_dim(self, layer: nn.Module) -> int:
        if hasattr(layer, "linear_attn"):
            return int(layer.linear_attn.head_k_dim)
        return int(layer.self_attn.head_dim)

    def num_heads(self, layer: nn.Module) -> int:
        if hasattr(layer, "linear_attn"):
            return int(layer.linear_attn.num_k_heads)
        return int(self.text_config.num_attention_heads)

    def queries_keys(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        want_queries: bool,
        want_keys: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """See ``ModelAdapter.queries_keys``. Full attention: q (T, H, d) without its gate half,
        after ``q_norm``/``k_norm``, RoPE on the rotary part. Linear attention: the Gated DeltaNet's
        q, k (T, H_k, d_k) of ``hidden`` read as one sequence (its causal convolution starts from
        zeros, as for the first token of a prompt), L2-normalised per head; the "after RoPE" pair
        is the same tensors (the layer has no positions)."""
        if hasattr(layer, "linear_attn"):
            q, k = self._linear_queries_keys(layer, hidden)
            q = q if want_queries else None
            k = k if want_keys else None
            with_rope = cos is not None and sin is not None
            return q, k, q if with_rope else None, k if with_rope else None
        x = layer.input_layernorm(hidden[None])  # (1, T, D)
        attn = layer.self_attn
        d = int(attn.head_dim)
        q = k = None
        if want_queries:
            # q_proj emits, per head, the query then its output gate (Qwen3_5Attention.forward)
            q = attn.q_norm(attn.q_proj(x).view(1, x.shape[1], -1, 2 * d)[..., :d])
        if want_keys:
            k = attn.k_norm(attn.k_proj(x).view(1, x.shape[1], -1, d))
        q_rope = k_rope = None
        if cos is not None and sin is not None:
            rope = self.apply_rotary_fn(layer)
            qt = q.transpose(1, 2) if q is not None else None
            kt = k.transpose(1, 2) if k is not None else None
            qr, kr = rope(
                qt if qt is not None else torch.zeros_like(kt[:, :1]),
                kt if kt is not None else torch.zeros_like(qt[:, :1]),
                cos[None],
                sin[None],
            )
            q_rope = qr.transpose(1, 2)[0] if q is not None else None
            k_rope = kr.transpose(1, 2)[0] if k is not None else None
        return (q[0] if q is not None else None, k[0] if k is not None else None, q_rope, k_rope)

    def _linear_queries_keys(
        self, layer: nn.Module, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k), each (T, H_k, d_k) in the model dtype: Qwen3_5GatedDeltaNet.forward up to the
        recurrence (input norm, in_proj_qkv, causal conv + SiLU, split, per-head L2 norm in float32
        as its chunked and recurrent kernels do)."""
        net = layer.linear_attn
        module = sys.modules[type(net).__module__]
        x = layer.input_layernorm(hidden[None])  # (1, T, D)
        mixed = net.in_proj_qkv(x).transpose(1, 2)  # (1, C, T)
        mixed = module.causal_conv1d_fn(
            mixed, net.conv1d.weight.squeeze(1), net.conv1d.bias, activation=net.activation
        ).transpose(1, 2)  # (1, T, C)
        q, k, _ = torch.split(mixed, [net.key_dim, net.key_dim, net.value_dim], dim=-1)
        T = x.shape[1]
        q = module.l2norm(q.reshape(T, -1, net.head_k_dim).float(), dim=-1, eps=1e-6).to(hidden.dtype)
        k = module.l2norm(k.reshape(T, -1, net.head_k_dim).float(), dim=-1, eps=1e-6).to(hidden.dtype)
        return q, k

    def check_supported(self) -> None:
        """The base checks on the full-attention layers; a linear layer must be the Gated DeltaNet
        ``queries_keys`` models (nothing else in ``linear_attn``)."""
        reason = self.unsupported_reason()
        if reason:
            raise ValueError(f"pact cannot reduce tokens in this {type(self.model).__name__}: {reason}")
        linear = self.linear_attention_layers()
        for i, layer in enumerate(self.layers):
            if i not in linear:
                continue
            net = getattr(layer, "linear_attn", None)
            if net is None or not hasattr(layer, "input_layernorm"):
                raise ValueError(
                    f"decoder layer {i} is a linear_attention layer but has no linear_attn/input_layernorm; "
                    f"the {self.family} adapter cannot read it"
                )
            refuse_unknown_children(
                net, LINEAR_ATTENTION_CHILDREN, f"decoder layer {i}'s linear attention", self.family
            )
        for i, layer in enumerate(self.layers):
            if i in linear:
                continue
            attn = getattr(layer, "self_attn", None)
            missing = [n for n in ("q_proj", "k_proj", "q_norm", "k_norm") if not hasattr(attn, n)]
            if attn is None or missing:
                raise ValueError(
                    f"decoder layer {i} is a full_attention layer without self_attn "
                    f"{', '.join(missing)}; the {self.family} adapter cannot recompute its queries and keys"
                )
            refuse_unknown_children(
                attn, KNOWN_ATTENTION_CHILDREN, f"decoder layer {i}'s attention", self.family
            )


class Qwen3_5MoeAdapter(Qwen3_5Adapter):  # noqa: N801 (mirrors the Hugging Face class name)
    """Qwen3.5-MoE: the same hybrid decoder and vision tower, mixture-of-experts MLPs (which the
    engine never reads: each token is routed on its own, so reduction and batching do not interact
    with the routing)."""

    family = "qwen3_5_moe"
    class_names = ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel")
    model_types = ("qwen3_5_moe",)
    default_checkpoint = "Qwen/Qwen3.5-35B-A3B"
