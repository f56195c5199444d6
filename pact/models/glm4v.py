"""GLM-4.1V (``Glm4vForConditionalGeneration``): Qwen2-VL-like ViT and 3-D (t, h, w) M-RoPE.

What differs from Qwen2-VL, and what it means here:

- Positions: ``Glm4vModel.get_rope_index`` numbers a text run contiguously and gives each image
  (and each video *frame*: frames are separated by ``<|end_of_image|>`` + a timestamp text, so each is
  its own run) the grid (t0, h0 + i, w0 + j), advancing the text position by max(h, w); decoding
  continues from ``rope_deltas`` exactly as in Qwen2-VL (``decode_position_ids`` is inherited).
  ``position_mode="renumber"`` is therefore defined as for Qwen2-VL: kept tokens keep their (t, h, w)
  ids (= ``center``), see docs/CONFIGDOC.md.
- Attention: partial rotary (``partial_rotary_factor`` 0.5: RoPE on the first half of each head,
  interleaved pairs) and biased q/k projections, no q/k norms; the decoder layer's extra
  post-attention/post-MLP norms act after the attention. ``queries_keys`` of the base adapter is
  exact because it calls the layer's own ``apply_rotary_pos_emb`` (checked by the q/k contract test).
- Visual candidates are the ``<|image|>`` tokens (video frames use the same id); ``<|begin_of_image|>``,
  ``<|end_of_image|>``, ``<|begin_of_video|>``, ``<|end_of_video|>`` and timestamps are text.
- Videos: the frames of one video are the ``<|image|>`` runs between one ``<|begin_of_video|>`` and
  its ``<|end_of_video|>`` (the processor's own rule for ``mm_token_type_ids``, which
  ``get_rope_index`` reads); ``run_media`` reads them from ``input_ids``, so ``Signals.groups()``
  gives a video's frames as "frame" groups of one index and EVS / HoliTom run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pact.models.groups import media_by_delimiters, runs
from pact.models.qwen2_vl import Qwen2VLAdapter, QwenProbe


class Glm4vProbe(QwenProbe):
    """The GLM-4.1V ViT: fused qkv with vision RoPE and ``cu_seqlens`` per image like Qwen2-VL; the 2x2
    patches of a token are merged by a strided convolution (``downsample``) before the ``merger``, whose
    input is already one row per LLM token."""

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.rows_module()(features)

    def rows_module(self) -> nn.Module:
        return self.vlm.visual.merger


class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    class_names = ("Glm4vForConditionalGeneration", "Glm4vModel")
    model_types = ("glm4v",)
    default_checkpoint = "zai-org/GLM-4.1V-9B-Thinking"
    vision_probe_class = Glm4vProbe

    def run_media(self, inputs: Mapping[str, Any]) -> list[list[int]] | None:
        """The ``<|image|>`` runs between ``<|begin_of_video|>`` and ``<|end_of_video|>`` are the
        frames of one video; every other run is an image. None without video."""
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"{self.family}: the frames of a video are found from the call's input_ids")
        cfg = self.model.config
        begin = input_ids == int(cfg.video_start_token_id)
        if not bool(begin.any()):
            return None
        number = begin.long().cumsum(1)
        inside = number - (input_ids == int(cfg.video_end_token_id)).long().cumsum(1) > 0
        starts = [[a for a, _ in runs(row)] for row in self.candidate_mask(input_ids, inputs)]
        return media_by_delimiters(starts, number, inside)
