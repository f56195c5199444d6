"""Gemma 3 (``gemma3``, ``Gemma3ForConditionalGeneration``): a SigLIP tower pooled to a square grid of
``mm_tokens_per_image`` tokens per image (or per pan-and-scan crop), and a decoder whose layers differ:
``layer_types`` interleaves sliding-window layers (local RoPE table, window ``sliding_window``) with
global ones (global RoPE table), and the tokens of one image attend to each other in both directions
(full layers: causal OR same image block; sliding layers: that AND the window).

What the engine needs from this adapter is ``layer_attention`` (each layer's rotary table and window),
``layer_rotary`` (the model's rotary module for one table) and ``attention_blocks`` (the image blocks
the stock model derives from ``token_type_ids``); the engine applies them to the reduced layout
(``pact.ops.attention.build_block_window_mask``). The window is measured over each token's rotary
position (its original position under the default ``position_mode``): a reduced sliding layer then
attends only to pairs the stock layer attends to.

Pan-and-scan crops are image runs of their own (their own blocks) separated by text; only the image
soft tokens are candidates, so the text between crops is never removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pact.models.base import LayerAttention, ModelAdapter
from pact.models.groups import Group


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    class_names = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    model_types = ("gemma3",)
    default_checkpoint = "google/gemma-3-4b-it"

    # --- layers and masks -----------------------------------------------------------------------

    def layer_attention(self) -> list[LayerAttention]:
        """Per decoder layer: its rotary table (its ``layer_types`` entry) and, on a sliding layer,
        the window ``sliding_window``."""
        cfg = self.text_config
        return [
            LayerAttention(kind, cfg.sliding_window if kind == "sliding_attention" else None)
            for kind in cfg.layer_types[: len(self.layers)]
        ]

    def layer_rotary(
        self, kind: str, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_model.rotary_emb(hidden, positions[0], kind)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global layers' table (the engine asks ``layer_rotary`` per layer; this serves the
        position modes' bookkeeping)."""
        return self.layer_rotary("full_attention", hidden, positions)

    def attention_blocks(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Image blocks as the stock model builds them (``get_block_sequence_ids_for_mask``): each run
        of ``token_type_ids == 1`` is one block. Without ``token_type_ids`` the stock model's masks are
        causal (and windowed), so there are no blocks."""
        types = inputs.get("token_type_ids")
        if not isinstance(types, torch.Tensor) or types.shape != input_ids.shape:
            return None
        is_image = types.to(input_ids.device) == 1
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, starts.long().cumsum(1) - 1, -1)

    def unsupported_reason(self) -> str | None:
        cfg = self.text_config
        if getattr(cfg, "use_bidirectional_attention", False):
            return "use_bidirectional_attention=True (an encoder-style Gemma 3) has no causal order to keep"
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            return "attention logit soft-capping is not modelled by the key-based scores"
        # query_pre_attn_scalar != head_dim (27B: 168 vs 128) is supported: the scores read each
        # layer's own scale (ModelAdapter.attention_scale).
        return None

    # --- visual tokens --------------------------------------------------------------------------

    def visual_token_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id)]

    def visual_groups(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[list[Group]]:
        """Every image (and every pan-and-scan crop) is a square grid of ``mm_tokens_per_image``."""
        return self._square_visual_groups(
            input_ids, inputs, int(self.model.config.mm_tokens_per_image), "image"
        )
