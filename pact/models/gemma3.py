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
from pact.models.llava import ClipProbe


class Gemma3Probe(ClipProbe):
    """Gemma 3's SigLIP tower (no [CLS]; the projector reads the last layer after the post-layernorm).

    The projector average-pools each image's ``p x p`` patch grid with a ``k x k`` kernel into
    ``mm_tokens_per_image`` rows, normalises them (``mm_soft_emb_norm``) and multiplies by
    ``mm_input_projection_weight``. A row's value is the mean of its ``k x k`` patches' values (what the
    pooling does to the features), and the features a method merges are the pooled vectors, which
    ``project`` sends through the projector's norm and matrix, as the model does after its pooling.
    """

    has_cls = False

    def select_layer(self) -> int:
        return len(self.layers()) - 1

    def _pool(self, values: torch.Tensor, images: int) -> torch.Tensor:
        """(images * p * p, C) per-patch values -> (images * r * r, C) by the projector's pooling."""
        projector = self.vlm.multi_modal_projector
        p = int(projector.patches_per_image)
        x = values.reshape(images, p, p, -1).permute(0, 3, 1, 2)  # (N, C, p, p), as the projector
        pooled = projector.avg_pool(x).flatten(2).transpose(1, 2)  # (N, r * r, C)
        return pooled.reshape(-1, values.shape[-1])

    def to_rows(self, values: torch.Tensor, segments: list[int]) -> torch.Tensor:
        return self._pool(values, len(segments))

    def row_features(self, projector_input: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The projector's input (N, p * p, C) -> the pooled (R, C) vectors its rows are made from."""
        return self._pool(projector_input.reshape(-1, projector_input.shape[-1]), projector_input.shape[0])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        projector = self.vlm.multi_modal_projector
        normed = projector.mm_soft_emb_norm(features[None])
        return torch.matmul(normed, projector.mm_input_projection_weight)[0].type_as(features)


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    class_names = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    model_types = ("gemma3",)
    default_checkpoint = "google/gemma-3-4b-it"
    vision_probe_class = Gemma3Probe

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
