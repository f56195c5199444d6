"""What the engine needs to know about a model family, and nothing else.

An adapter answers model questions for one Hugging Face vision-language class: where the decoder
layers and the language model are, which tokens of ``input_ids`` are visual patch tokens (the only
reduction candidates), how rotary embeddings are applied and recomputed, how many heads there are,
and where the vision tower is. It never touches masks, caches or reduction state (that is the
engine's job) and never knows which method runs.

Every family adapter subclasses ``ModelAdapter`` and overrides only what differs. The default
attribute paths (``model.model.language_model.layers``, ``vision_tower`` / ``visual``) hold for every
family in transformers 5.23 except SmolVLM2 (``text_model``, ``vision_model``), whose adapter
overrides them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pact.models.groups import Group, mrope_groups, runs, square_groups
from pact.models.vision_probe import VisionProbe

KNOWN_ATTENTION_CHILDREN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"})
"""Sub-modules of a decoder layer's attention that ``ModelAdapter.queries_keys`` models: the
projections and the optional per-head q/k norms. Any other sub-module (an extra projection, a
gate ...) makes ``check_supported`` refuse the model instead of computing wrong queries/keys."""


def refuse_unknown_children(
    module: nn.Module, known: frozenset[str] | set[str], what: str, family: str
) -> None:
    """Raise ValueError when ``module`` has sub-modules outside ``known``: an attention (or linear
    attention) the adapter does not model would give wrong recomputed queries/keys, silently."""
    unknown = sorted({name for name, _ in module.named_children()} - set(known))
    if unknown:
        raise ValueError(
            f"{what} ({type(module).__name__}) has sub-modules {', '.join(unknown)} that the {family} "
            f"adapter does not model (known: {', '.join(sorted(known))}); its queries/keys would be wrong"
        )


class ModelAdapter:
    """Family-specific answers about one model instance.

    Class attributes:
        family: short family name (the key in ``pact.models.ADAPTERS``).
        class_names: Hugging Face class names this adapter accepts; the first is the
            ``*ForConditionalGeneration`` class (loaded by the lmms-eval model, built by
            ``pact.testing``).
        model_types: ``config.model_type`` values this adapter accepts.
        mrope: True when positions are M-RoPE (t, h, w) triples (Qwen2-VL / Qwen2.5-VL).
        has_video: the Hugging Face class and processor accept videos.
        video_frames_as_images: a video's frames reach the language model as images that nothing in
            the call tells apart from images (InternVL: "Frame<i>: <img>...</img>" tiles, SmolVLM2:
            frame images, both with the image token id and no video grid), so methods that need a
            video's frames (EVS, HoliTom) refuse the family. Families whose frames are separate runs
            that the call does identify (Qwen3-VL, Qwen3.5: ``<|video_pad|>`` runs counted by
            ``video_grid_thw``; GLM-4.1V: runs between ``<|begin_of_video|>`` / ``<|end_of_video|>``)
            keep it False and say which runs form one video in ``run_media``.
        default_checkpoint: hub id the lmms-eval model loads without ``pretrained=``.
        vision_probe_class: the ``pact.models.vision_probe.VisionProbe`` subclass of the family's
            vision encoder (None: vision-side methods do not run on this family).
        base_and_sub_images: images are encoded as a base image plus optional sub-image crops
            (LLaVA's anyres; LLaVA-1.5: the base image alone), the layout HiRED's budget split needs.
        has_cls: the vision encoder has a [CLS] token (from the probe class; False without a probe).

    Every family list of pact (lmms-eval models and manifests, ``pact methods``, the tiny models of
    ``pact.testing``) is derived from these attributes of the adapters in ``pact.models.ADAPTERS``.
    """

    family: str = ""
    class_names: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    mrope: bool = False
    has_video: bool = False
    video_frames_as_images: bool = False
    default_checkpoint: str = ""
    vision_probe_class: type[VisionProbe] | None = None
    base_and_sub_images: bool = False
    has_cls: bool = False  # set from the probe by __init_subclass__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.has_cls = cls.vision_probe_class is not None and cls.vision_probe_class.has_cls

    @classmethod
    def eval_model_name(cls) -> str:
        """The lmms-eval ``--model`` name of this family (``pact_<family>``)."""
        return f"pact_{cls.family}"

    @classmethod
    def eval_class_name(cls) -> str:
        """Name of this family's lmms-eval model class in ``pact.eval.models`` (``Pact`` + the Hugging
        Face class name without ``ForConditionalGeneration``, e.g. ``PactQwen2VL``)."""
        return "Pact" + cls.class_names[0].removesuffix("ForConditionalGeneration")

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- modules -------------------------------------------------------------------------------

    @property
    def vlm(self) -> nn.Module:
        """The multimodal base model (``*Model``: vision tower + projector + language model)."""
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    @property
    def text_model(self) -> nn.Module:
        """The decoder-only language model whose layers the engine hooks."""
        return self.vlm.language_model

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in call order."""
        return self.text_model.layers

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    def vision_tower(self) -> nn.Module:
        """The vision encoder (for vision-side methods that read its attention)."""
        vlm = self.vlm
        return vlm.visual if hasattr(vlm, "visual") else vlm.vision_tower

    def vision_probe(self) -> VisionProbe:
        """The probe of this model's vision encoder (what vision-side methods read).

        Raises:
            ValueError: the family declares no probe (``vision_probe_class`` is None).
        """
        if self.vision_probe_class is None:
            raise ValueError(f"vision-side methods do not support model family {self.family!r}")
        return self.vision_probe_class(self)

    @property
    def attn_implementation(self) -> str:
        """The attention backend the decoder layers use (``eager``, ``sdpa``, ``flash_attention_2`` ...)."""
        impl = getattr(self.text_config, "_attn_implementation", None)
        if impl is None:
            impl = getattr(self.model.config, "_attn_implementation", None)
        return impl or "eager"

    # --- attention geometry ---------------------------------------------------------------------

    def head_dim(self, layer: nn.Module) -> int:
        return int(layer.self_attn.head_dim)

    def num_heads(self, layer: nn.Module) -> int:
        return int(layer.self_attn.q_proj.out_features) // self.head_dim(layer)

    def attention_scale(self, layer: nn.Module) -> float | None:
        """The softmax scale of ``layer``'s attention logits as the model applies it
        (``layer.self_attn.scaling``), or None when it is exactly ``head_dim ** -0.5``, the scoring
        ops' default (so those keep their exact default arithmetic).

        Gemma 3 scales by ``query_pre_attn_scalar ** -0.5`` (27B: 168 ** -0.5 with head_dim 128);
        the other registered families by ``head_dim ** -0.5``. A layer without ``self_attn`` (a
        hybrid decoder's linear-attention layer, ``linear_attention_layers``) and an attention module
        without ``scaling`` give None: Qwen3.5's Gated DeltaNet scales its queries by
        ``head_k_dim ** -0.5`` itself, the default of the ops reading its q/k.

        Raises:
            ValueError: the scale is not a finite positive number (names the layer and the value).
        """
        attn = getattr(layer, "self_attn", None)
        scaling = getattr(attn, "scaling", None) if attn is not None else None
        if scaling is None:
            return None
        scale = float(scaling)
        if not (math.isfinite(scale) and scale > 0):
            index = next((i for i, m in enumerate(self.layers) if m is layer), "?")
            raise ValueError(
                f"decoder layer {index}'s attention scale (self_attn.scaling) is {scale}; "
                "it must be a finite positive number"
            )
        return None if scale == float(self.head_dim(layer)) ** -0.5 else scale

    def queries_keys(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        want_queries: bool,
        want_keys: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Queries and keys of ``layer`` for ``hidden`` computed exactly as the layer computes them.

        Args:
            hidden: (T, D) hidden states entering the layer (residual stream, before its norm).
            cos, sin: (T, head_dim) rotary tables of these tokens, or None to skip RoPE.
        Returns:
            (q, k, q_rope, k_rope): q (T, H, d), k (T, H_kv, d) before RoPE and the same after RoPE
            (None where not requested / no cos-sin). Model dtype.
        """
        x = layer.input_layernorm(hidden[None])  # (1, T, D)
        d = self.head_dim(layer)
        attn = layer.self_attn
        q = attn.q_proj(x).view(1, x.shape[1], -1, d) if want_queries else None
        k = attn.k_proj(x).view(1, x.shape[1], -1, d) if want_keys else None
        # Per-head q/k norms (Qwen3, Gemma 3, ...) act on (..., heads, d) before RoPE.
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if q is not None and q_norm is not None:
            q = q_norm(q)
        if k is not None and k_norm is not None:
            k = k_norm(k)
        q_rope = k_rope = None
        if cos is not None and sin is not None:
            rope = self.apply_rotary_fn(layer)
            # The model's RoPE works on (B, heads, T, d) with cos/sin (B, T, d).
            qt = q.transpose(1, 2) if q is not None else None
            kt = k.transpose(1, 2) if k is not None else None
            if qt is None:
                qt = torch.zeros_like(kt[:, :1])
            if kt is None:
                kt = torch.zeros_like(qt[:, :1])
            qr, kr = rope(qt, kt, cos[None], sin[None])
            q_rope = qr.transpose(1, 2)[0] if q is not None else None
            k_rope = kr.transpose(1, 2)[0] if k is not None else None
        return (
            q[0] if q is not None else None,
            k[0] if k is not None else None,
            q_rope,
            k_rope,
        )

    def check_supported(self) -> None:
        """Raise ValueError when this model has structure the engine or ``queries_keys`` does not
        model (an attention module with unknown sub-modules, a layer without the expected norm and
        projections). Families override ``unsupported_reason`` to declare what they cannot handle."""
        reason = self.unsupported_reason()
        if reason:
            raise ValueError(f"pact cannot reduce tokens in this {type(self.model).__name__}: {reason}")
        for i, layer in enumerate(self.layers):
            attn = getattr(layer, "self_attn", None)
            missing = [n for n in ("input_layernorm", "self_attn") if not hasattr(layer, n)]
            missing += [
                f"self_attn.{n}" for n in ("q_proj", "k_proj") if attn is not None and not hasattr(attn, n)
            ]
            if missing:
                raise ValueError(
                    f"decoder layer {i} ({type(layer).__name__}) has no {', '.join(missing)}; "
                    f"the {self.family} adapter cannot recompute its queries and keys"
                )
            refuse_unknown_children(
                attn, KNOWN_ATTENTION_CHILDREN, f"decoder layer {i}'s attention", self.family
            )

    def unsupported_reason(self) -> str | None:
        """Why this model instance cannot be reduced (None: it can). Override per family."""
        return None

    def linear_attention_layers(self) -> frozenset[int]:
        """Indices of decoder layers without softmax attention (linear attention / recurrent token
        mixers: a per-sequence conv and recurrent state, no KV cache, no positions, a 2-D padding
        mask). The engine feeds them the reduced layout's 2-D padding mask instead of its 4-D mask
        or key bias. Override in hybrid families (Qwen3.5); default: none."""
        return frozenset()

    def apply_rotary_fn(self, layer: nn.Module) -> Any:
        """The ``apply_rotary_pos_emb(q, k, cos, sin)`` the layer's attention module calls."""
        module = sys.modules[type(layer.self_attn).__module__]
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is None:
            raise RuntimeError(f"{module.__name__} has no apply_rotary_pos_emb; the adapter needs updating")
        return fn

    # --- positions ------------------------------------------------------------------------------

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, T, head_dim) of ``positions`` (A, B, T) with the model's rotary module."""
        pos = positions if self.mrope else positions[0]
        return self.text_model.rotary_emb(hidden, pos)

    def normalize_positions(self, position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The rotary position ids the text model uses, as (A, B, T) (A = 3 for M-RoPE, else 1)."""
        if position_ids is None:
            return None
        if self.mrope:
            if position_ids.ndim == 2:
                position_ids = position_ids[None].expand(3, *position_ids.shape)
            elif position_ids.shape[0] == 4:
                position_ids = position_ids[1:]
            return position_ids.expand(3, batch, position_ids.shape[-1])
        if position_ids.ndim == 1:
            position_ids = position_ids[None]
        return position_ids.expand(batch, position_ids.shape[-1])[None]

    def decode_position_ids(self, start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
        """Position ids the stock model would build for a cached call without ``position_ids``,
        when ``start`` tokens (unreduced timeline) were seen before (used when layer 0 is reduced,
        so the cache no longer tells the unreduced length)."""
        pos = torch.arange(start, start + length, device=device)
        return pos[None].expand(batch, length)

    # --- visual tokens --------------------------------------------------------------------------

    def visual_token_ids(self) -> list[int]:
        """Ids of the placeholder tokens the vision features replace (image, video)."""
        cfg = self.model.config
        ids = []
        for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value >= 0 and value not in ids:
                ids.append(value)
        return ids

    def candidate_mask(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        """(B, T) bool: True at visual patch tokens (the reduction candidates).

        ``inputs`` are the keyword arguments of the multimodal model call (image sizes, grids ...);
        families with non-patch slots inside the visual spans (image newlines) remove them here.
        """
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for tid in self.visual_token_ids():
            mask |= input_ids == tid
        return mask

    def removable_mask(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        """(B, T) bool: non-candidate slots inside the visual spans that a method may remove together
        with visual tokens (``Reduction.drop_removable``), e.g. image newlines, which an official
        vision-side code may leave out of the sequence it builds. Never a candidate. Default: none.
        """
        return torch.zeros_like(input_ids, dtype=torch.bool)

    # --- visual token grids ---------------------------------------------------------------------

    def visual_groups(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[list[Group]]:
        """Per sample, the row-major grids of its visual tokens (``pact.models.groups.Group``), from
        ``input_ids`` (B, T) and the call's keyword arguments. Used when ``mrope`` is False.

        Raises:
            ValueError: the family has no grid layout (override in the family's adapter).
        """
        raise ValueError(f"no visual token layout for model family {self.family!r}")

    def position_groups(
        self, positions: torch.Tensor, visual_mask: torch.Tensor, media: list[int] | None = None
    ) -> list[Group]:
        """The grids of one sample's visual tokens from its (3, T) M-RoPE positions and (T,) visual
        mask (``mrope`` families: each run of visual tokens spans an (h, w) grid, frame by frame);
        ``media``: the sample's ``run_media`` (None: each run is one image or video)."""
        if not self.mrope:
            raise ValueError(f"{self.family}: positions are not M-RoPE triples; use visual_groups")
        return mrope_groups(positions, visual_mask, media)

    def run_media(self, inputs: Mapping[str, Any]) -> list[list[int]] | None:
        """Per sample, for each run of reduction candidates in token order, the index (per sample,
        from 0) of the image or video it belongs to, for ``mrope`` families whose video frames are
        separate runs with text between them (Qwen3-VL's timestamps): consecutive runs sharing an
        index are the frames of one video (``pact.models.groups.mrope_groups``). ``inputs``: the
        prefill call's keyword arguments, ``input_ids`` (B, T) included. None (the default): every
        run is one image or one whole video (Qwen2-VL), or the call has no video.

        Raises:
            ValueError: the call does not say which runs form one video.
        """
        return None

    def _square_visual_groups(
        self, input_ids: torch.Tensor, inputs: Mapping[str, Any], per_image: int, kind: str
    ) -> list[list[Group]]:
        """Per sample groups when every ``per_image`` consecutive candidates form one square grid."""
        candidates = self.candidate_mask(input_ids, inputs)
        return [square_groups([n for _, n in runs(row)], per_image, kind) for row in candidates]

    # --- features added to visual tokens inside the decoder (Qwen3-VL's DeepStack) --------------

    injects_visual_features: bool = False
    """The text model adds per-visual-token features to the hidden states after some decoder layers
    (Qwen3-VL's DeepStack). True: the engine takes them out of the text model's call
    (``take_visual_injection``) and adds them itself after those layers (``inject``), following the
    reductions."""

    def take_visual_injection(self, kwargs: dict[str, Any]) -> VisualInjection | None:
        """Text-model pre-hook of a reduced prefill: remove the visual features the text model would
        add after some decoder layers from its keyword arguments ``kwargs`` (in place) and return them
        (None: this call has none). Only called when ``injects_visual_features``."""
        return None

    def inject(self, hidden: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B, R, D) with ``features`` (M, D) added at the M positions of ``mask`` (B, R)
        (row-major order), out of place. The default is the plain residual addition (in the hidden
        states' dtype); a family whose model adds them otherwise overrides it with the model's own
        function (Qwen3-VL: ``_deepstack_process``)."""
        mask = mask.to(hidden.device)
        out = hidden.clone()
        out[mask] = out[mask] + features.to(hidden.device, hidden.dtype)
        return out

    # --- layers that differ in rotary table and mask (Gemma 3: sliding and global layers) ----------

    def layer_attention(self) -> list[LayerAttention] | None:
        """Per decoder layer, its rotary table and mask rule, or None (default) when every layer uses
        the model's one rotary table and a plain causal mask. Given, the engine computes each reduced
        layer's cos/sin with ``layer_rotary(kind, ...)`` and its mask with
        ``pact.ops.attention.build_block_window_mask`` (image blocks from ``attention_blocks``, the
        window over the layer's rotary positions), in prefill and cached steps, on eager and sdpa
        (explicit masks: the sdpa fast path cannot express image blocks)."""
        return None

    def layer_rotary(
        self, kind: str, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, T, head_dim) of ``positions`` (A, B, T) with the rotary table ``kind`` (a
        ``LayerAttention.rotary``). Default: the model's one table (``rotary``)."""
        return self.rotary(hidden, positions)

    def attention_blocks(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """(B, T) long: the image block of each token whose tokens attend to each other in both
        directions (>= 0), -1 elsewhere; None (default): attention is causal everywhere."""
        return None


@dataclass(frozen=True)
class LayerAttention:
    """How one decoder layer attends (``ModelAdapter.layer_attention``).

    rotary: name of its rotary table (layers with the same name share cos/sin).
    window: sliding window over rotary positions (a key is visible to a query when
        ``position(key) > position(query) - window``, the stock rule), None for a full layer.
    """

    rotary: str
    window: int | None = None


@dataclass
class VisualInjection:
    """Visual features a text model adds to the hidden states after some of its decoder layers.

    mask: (B, T) bool, the prefill positions that receive features.
    features: decoder layer index k -> (M, D) features added to the output of layer k, one row per
        True of ``mask`` in row-major (sample, position) order (M = mask.sum()).
    """

    mask: torch.Tensor
    features: dict[int, torch.Tensor]


def unsupported_model_error(model: nn.Module, supported: Mapping[str, type[ModelAdapter]]) -> ValueError:
    classes = sorted({name for cls in supported.values() for name in cls.class_names})
    return ValueError(
        f"pact does not support {type(model).__name__} (config.model_type="
        f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}); "
        f"supported classes: {', '.join(classes)}"
    )
