"""Vision-side methods: VisPruner, PruMerge(+) and HiRED choose the visual tokens from the vision
encoder's attention, then remove them before decoder layer ``cfg.layer`` (0 in their configs, i.e.
before the language model sees them).

How the vision-encoder attention is obtained (no eager switch, no patched forward):

The family-specific part (which encoder layers and modules, how their queries/keys are recomputed,
how patches map to the projector's rows) is the adapter's ``VisionProbe`` (``adapter.vision_probe()``,
defined next to each adapter in ``pact.models``); a family without one does not run these methods.

1. ``install`` (at ``pact.apply``) registers forward pre-hooks on the attention module of the
   encoder layers a method reads, and a forward hook on the module whose output rows become the
   LLM's visual tokens (the multimodal projector, Qwen's patch merger). The pre-hook receives the
   layer's (normed) input and recomputes that layer's queries and keys exactly as the module does
   (its own projections, q/k norms, rotary embedding), then keeps only the signal a method needs
   (`SignalSpec`):
   * encoders with a [CLS] token (CLIP in LLaVA-1.5 / LLaVA-NeXT, InternViT): the attention of the
     [CLS] query over the patches (``pact.ops.vision.cls_attention``) as each official code reads
     it: head mean (VisPruner, optionally in the model dtype), head sum (HiRED), or one head over
     the full q/k width (PruMerge);
   * encoders without one (SigLIP in LLaVA-OneVision, the Qwen2-VL / Qwen2.5-VL ViTs): the documented
     substitute ``pact.ops.vision.mean_received_attention``, the mean attention each patch receives
     from all patches of its image (or of its attention window), computed in query chunks.
   The signal of each patch is then carried to the projector rows with the model's own layout:
   one row per patch (CLIP, SigLIP; [CLS] dropped under the "default" feature strategy), the mean
   over the 2x2 patches of InternVL's pixel shuffle (the model's ``pixel_shuffle`` applied to the
   signal map) and of Qwen's merger (4 consecutive patches). LLaVA-OneVision videos additionally get
   the model's own ``apply_pooling`` view. On request the projector's input rows are recorded too
   ("features": the encoder's selected-layer outputs the official methods compare and merge), and
   every row carries the number of the encoder image (crop) it comes from.
2. At the reduction layer every visual token of a sample is matched to the captured row it was
   built from: nearest row of its LLM input embedding (exact copies in every family; LLaVA-NeXT's
   unpadding, newline slots and batch order need no re-derivation, and it works in ``generate``,
   where transformers encodes the images before the prefill without passing ``image_sizes``).
   Rows a model interpolated (LLaVA-OneVision's ``anyres_max`` downscaling) take the nearest row's
   signal, an approximation.

Which encoder layer: the one whose output feeds the projector (``vision_feature_layer``; Qwen's last
block) for VisPruner and HiRED's selection, the next one for PruMerge (the layer whose attention the
original computes on the selected features), layer 0 for HiRED's budget split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pact.methods.base import CLUSTERING, PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction, split_budget, target_count
from pact.methods.layout import Group, sample_groups
from pact.models import ADAPTERS
from pact.models.vision_probe import VisionProbe
from pact.ops.reduction import Reduction
from pact.ops.scoring import keep_count, topk_indices
from pact.ops.vision import (
    cls_attention,
    hired_budgets,
    hired_crop_scores,
    hired_image_rows,
    mean_received_attention,
    prumerge,
    vispruner_crops,
    vispruner_select,
)

# ---------------------------------------------------------------------------------------------------
# Capture


@dataclass(frozen=True)
class SignalSpec:
    """How one vision signal is read: encoder ``layer``; ``heads`` "mean" or "sum" of the per-head
    [CLS] attention, or "one" = a single head over the full q/k width with scale C^-1/2 (PruMerge);
    ``model_dtype``: compute the attention in the encoder's dtype (as an official fp16 run does)
    instead of float32. Encoders without [CLS] get the substitute signal (heads "one" still merges
    the heads into one)."""

    layer: int
    heads: str = "mean"
    model_dtype: bool = False


class VisionCapture:
    """Hooks that record, for every vision-encoder call, the rows sent to the LLM and per-row signals.

    ``layers`` maps a signal name to an encoder layer index or a `SignalSpec`; each signal is the
    [CLS] attention (or the substitute) of that layer, shape (R, 1); ``keys_of`` names the signals
    whose full-width keys (R, H * d) are recorded too, as "<name>_keys"; ``features`` records the
    projector's input rows (R, F) as "features" (the encoder's selected-layer output: VisPruner's
    and PruMerge's official features). ``records`` holds one dict per call: ``rows`` (R, D),
    ``values`` {name: (R, C)}, ``crop`` (R,) long (the encoder image/crop of each row, numbered across
    the calls of one prefill; extra views get their own numbers), plus extra views.
    """

    def __init__(
        self,
        adapter: Any,
        layers: dict[str, int | SignalSpec],
        keys_of: tuple[str, ...] = (),
        features: bool = False,
    ) -> None:
        self.probe = adapter.vision_probe()
        n = len(self.probe.layers())
        specs = {k: v if isinstance(v, SignalSpec) else SignalSpec(int(v)) for k, v in layers.items()}
        for name, spec in specs.items():
            if not 0 <= spec.layer < n:
                raise ValueError(
                    f"vision signal {name!r} reads encoder layer {spec.layer}; the encoder has {n} layers"
                )
            if spec.heads not in ("mean", "sum", "one"):
                raise ValueError(
                    f"vision signal {name!r}: heads must be 'mean', 'sum' or 'one', got {spec.heads!r}"
                )
        self.specs = specs
        self.layers = {k: v.layer for k, v in specs.items()}
        self.keys_of = keys_of
        self.features = features
        self.records: list[dict[str, Any]] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._segments: list[int] = []
        self._crops = 0
        self._muted = False
        self.handles: list[Any] = []

    def attach(self) -> None:
        if self.handles:
            return
        for layer in sorted(set(self.layers.values())):
            module = self.probe.attention(layer)
            names = [name for name, j in self.layers.items() if j == layer]
            self.handles.append(
                module.register_forward_pre_hook(self._attention_hook(names), with_kwargs=True)
            )
        self.handles.append(self.probe.rows_module().register_forward_hook(self._rows_hook))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.clear()

    def clear(self) -> None:
        self.records.clear()
        self._pending.clear()
        self._crops = 0

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Projector input rows (R, F) -> LLM input rows (R, D) (float32), without being recorded.
        Differentiable when gradients are on (losses under reduction reach the vision tower)."""
        module = self.probe.rows_module()
        dtype = next(module.parameters()).dtype
        self._muted = True
        try:
            return self.probe.project(features.to(dtype)).float()
        finally:
            self._muted = False

    def _signal(self, spec: SignalSpec, qs: torch.Tensor, ks: torch.Tensor, scale: float) -> torch.Tensor:
        """(S,) signal of one image's S encoder tokens ([CLS] first if the encoder has one)."""
        if spec.heads == "one":  # one head over the full width (PruMerge's C^-1/2 attention)
            qs, ks = qs.reshape(qs.shape[0], 1, -1), ks.reshape(ks.shape[0], 1, -1)
            scale = qs.shape[-1] ** -0.5
        dtype = qs.dtype if spec.model_dtype else torch.float32
        if self.probe.has_cls:
            heads = "sum" if spec.heads == "sum" else "mean"
            patches = cls_attention(qs[0], ks[1:], ks[0], scale=scale, heads=heads, dtype=dtype)
            return torch.cat([patches.max().reshape(1), patches])  # [CLS] row: most important
        return mean_received_attention(qs, ks, scale=scale)

    def _attention_hook(self, names: list[str]) -> Any:
        probe = self.probe

        @torch.no_grad()
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            q, k, segments = probe.qk(module, args, kwargs)
            scale = probe.scale(module)
            for name in names:
                spec = self.specs[name]
                scores = [
                    self._signal(spec, qs, ks, scale)
                    for qs, ks in zip(torch.split(q, segments), torch.split(k, segments), strict=True)
                ]
                self._pending[name] = torch.cat(scores)[:, None]
                if name in self.keys_of:
                    self._pending[name + "_keys"] = k.flatten(1).float()
            self._segments = list(segments)

        return hook

    def _rows_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._muted or not self._pending:
            return
        out = output[0] if isinstance(output, tuple) else output
        rows = out.reshape(-1, out.shape[-1]).detach()
        features = None
        if self.features:
            # Not detached: merged features are projected again and must carry gradients to the
            # vision tower when the forward runs with gradients (a view, so free otherwise).
            features = self.probe.row_features(args[0], rows.shape[0])
        with torch.no_grad():
            self._record_rows(rows, features)

    def _record_rows(self, rows: torch.Tensor, features: torch.Tensor | None) -> None:
        segments = self._segments
        values = {name: self.probe.to_rows(v, segments) for name, v in self._pending.items()}
        if features is not None:
            values["features"] = features
        crop = self.probe.row_crops(rows.shape[0], segments, rows.device) + self._crops
        self._crops = int(crop.max()) + 1 if crop.numel() else self._crops
        for name, v in values.items():
            if v.shape[0] != rows.shape[0]:
                raise RuntimeError(
                    f"vision capture: {v.shape[0]} {name} values for {rows.shape[0]} projector rows"
                )
        record = {"rows": rows, "values": values, "crop": crop}
        self.records.append(record)
        for extra_rows, extra_values in self.probe.views(rows, values, segments):
            # one view row per crop slice of equal size; each view crop gets a new number (its rows
            # are not the crop's rows: a per-crop rule must not mix the two)
            per_view = extra_rows.shape[0] // max(1, len(segments))
            view_crop = torch.arange(len(segments), device=rows.device).repeat_interleave(per_view)
            view_crop = view_crop + self._crops
            self._crops += len(segments)
            self.records.append({"rows": extra_rows, "values": extra_values, "crop": view_crop})
        self._pending = {}


_PROJECTION_DIM = 32
_MATCH_ITEMS = 1 << 24  # floats per temporary in match_rows (64 MiB)


def match_rows(
    embeds: torch.Tensor, rows: torch.Tensor, candidates: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the captured row each visual token was built from, and whether it is an exact copy.

    The ``candidates`` nearest rows in a fixed, seeded 32-d random projection (float32), then the
    nearest of those in full width (near-duplicate rows, e.g. flat image regions, are told apart
    there). A token is *exact* when its distance to the chosen row is below 1e-6 of its norm (bit
    copies in every family; interpolated tokens are not). Rows within that distance of the nearest
    are ties, resolved to the lowest row index: the same image twice in a batch (two questions on
    one image) gives equal rows, and every token of either copy must come from the same crop, else a
    per-crop rule (VisionZip's counts, PruMerge's images) would see one image as two.

    Args:
        embeds: (N, D) LLM input embeddings of the visual tokens. rows: (R, D) captured rows.
    Returns:
        (LongTensor[N] row index, BoolTensor[N] exact).
    """
    gen = torch.Generator(device="cpu").manual_seed(12345)
    w = torch.randn(embeds.shape[1], _PROJECTION_DIM, generator=gen).to(embeds.device)
    r = rows.float()
    pr = r @ w
    k = min(candidates, r.shape[0])
    n, d = embeds.shape
    # chunks of tokens bound the (chunk, R) projected distances and the (chunk, k, D) differences
    step = max(1, min(_MATCH_ITEMS // max(1, r.shape[0]), _MATCH_ITEMS // max(1, k * d)))
    best, exact = [], []
    for start in range(0, n, step):
        e = embeds[start : start + step].float()
        near = torch.cdist(e @ w, pr).topk(k, dim=1, largest=False).indices  # (c, k)
        near = near.sort(dim=1).values  # candidates by row index: ties go to the lowest
        full = torch.linalg.vector_norm(e[:, None, :] - r[near], dim=-1)  # (c, k)
        tolerance = 1e-6 * torch.linalg.vector_norm(e, dim=1).clamp_min(1e-12)
        err = full.min(dim=1).values
        pick = (full <= (err + tolerance)[:, None]).int().argmax(dim=1)  # the first of the ties
        best.append(near.gather(1, pick[:, None]).squeeze(1))
        exact.append(err <= tolerance)
    if not best:
        empty = torch.zeros(0, dtype=torch.long, device=embeds.device)
        return empty, empty.bool()
    return torch.cat(best), torch.cat(exact)


# ---------------------------------------------------------------------------------------------------
# Methods


class VisionMethod(Method):
    """Common part: capture hooks, the per-token signals of a sample, family checks."""

    needs_merge = False
    families: tuple[str, ...] = ()  # derived from pact.models.ADAPTERS by `supports` (below)
    why_not = ""
    keys_of: tuple[str, ...] = ()  # signals whose full-width keys are recorded too

    def wants_features(self) -> bool:
        """Record the projector's input rows ("features") too."""
        return False

    @classmethod
    def supports(cls, adapter: Any) -> bool:
        """Whether the method runs on a family (an adapter class or instance): its encoder has a
        probe. Methods needing more of the family override this with adapter attributes."""
        return adapter.vision_probe_class is not None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.families = tuple(family for family, adapter in ADAPTERS.items() if cls.supports(adapter))

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if getattr(config, "progressive", False):
            raise ValueError(
                f"{self.name} selects tokens once from the vision encoder: set progressive=false"
            )
        self.capture: VisionCapture | None = None
        # the rows the last prefill consumed and the pre-encoded outputs they belong to: generate
        # without a cache runs every step as a prefill on the same ``mm_encoder_outputs`` and the
        # encoder only once (see `captured`)
        self._consumed: tuple[list[torch.Tensor], dict[str, torch.Tensor]] | None = None

    def signal_layers(self, probe: VisionProbe) -> dict[str, int | SignalSpec]:
        """Signal name -> vision-encoder layer (or `SignalSpec`) whose [CLS] attention (or
        substitute) is recorded."""
        return {"attn": probe.select_layer()}

    def input_layers(self, num_layers: int) -> list[int]:
        return [0] if int(self.config.layer) > 0 else []

    def install(self, model: Any, adapter: Any) -> list[Any]:
        """Install the capture hooks (``pact.apply``); ``pact.remove`` removes the returned handles.

        Raises:
            ValueError: the model family is not supported by this method (says why).
        """
        if not self.supports(adapter):
            raise ValueError(
                f"{self.name} does not support the {adapter.family!r} model family: {self.why_not} "
                f"(supported: {', '.join(self.families)})"
            )
        if self.capture is not None:
            self.capture.detach()
        probe = adapter.vision_probe()
        self.capture = VisionCapture(
            adapter, self.signal_layers(probe), self.keys_of, features=self.wants_features()
        )
        self.capture.attach()
        return list(self.capture.handles)

    def prepare(self, model: Any, adapter: Any, inputs: dict[str, Any], context: dict[str, Any]) -> None:
        if self.capture is None:
            raise ValueError(f"{self.name}: the vision capture hooks are not installed (use pact.apply)")
        if any(k.startswith("pixel_values") and v is not None for k, v in inputs.items()):
            self.capture.clear()  # the encoder runs inside this forward: drop anything older

    def finish(self, context: dict[str, Any]) -> None:
        # Nothing to clear: the records were moved into this call's context when first read, and in
        # `generate` the next prompt's encoder output may already be captured when this runs.
        return None

    def captured(self, signals: Signals) -> dict[str, torch.Tensor]:
        """Every captured encoder row of this prefill: {"rows": (R, D), "crop": (R,), name: (R, C)}."""
        ctx = signals.context
        if "pact.vision.rows" not in ctx:
            records = self.capture.records if self.capture is not None else []
            encoded = _encoder_outputs(signals.inputs)
            if not records and self._consumed is not None and _same_tensors(self._consumed[0], encoded):
                # a later step of generate(use_cache=False): the same encoder outputs, encoder not rerun
                ctx["pact.vision.rows"] = self._consumed[1]
                return ctx["pact.vision.rows"]
            if not records:
                raise ValueError(
                    f"{self.name} found no captured vision-encoder output for this prefill: the visual "
                    "tokens must come from the model's own vision encoder in the same call (or, in "
                    "`generate`, its encoding step), not from precomputed embeddings"
                )
            names = records[0]["values"].keys()
            ctx["pact.vision.rows"] = {
                "rows": torch.cat([r["rows"] for r in records]),
                "crop": torch.cat([r["crop"] for r in records]),
                **{n: torch.cat([r["values"][n] for r in records]) for n in names},
            }
            self.capture.clear()  # consumed by this prefill
            self._consumed = (encoded, ctx["pact.vision.rows"]) if encoded else None
        return ctx["pact.vision.rows"]

    def token_signals(self, signals: Signals) -> dict[str, torch.Tensor]:
        """Per visual token of the sample: {"embeds": (N, D), name: (N, C), "crop": (N,), "row": (N,)}
        ("row": the captured row, see `captured`, the token was built from)."""
        cap = self.captured(signals)
        hidden = signals.hidden if signals.layer == 0 else signals.layer_input(0)
        if hidden.shape[0] != signals.visual_mask.shape[0]:
            raise ValueError(f"{self.name} must be the first reduction of the sample")
        embeds = hidden[signals.visual_mask]
        best, exact = match_rows(embeds, cap["rows"].to(embeds.device))
        if embeds.shape[0] and not bool(exact.any()):
            raise ValueError(
                f"{self.name}: the visual tokens do not match the captured vision-encoder outputs "
                "(stale capture?)"
            )
        out = {k: v.to(embeds.device)[best] for k, v in cap.items() if k != "rows"}
        out["embeds"] = embeds
        out["row"] = best
        return out

    def keep_total(self, n: int) -> int:
        target = target_count(self.config, n)
        return keep_count(n, float(self.config.keep_ratio)) if target is None else target


def _encoder_outputs(inputs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors of the pre-encoded vision outputs ``generate`` passes (``mm_encoder_outputs``:
    per modality a ``pooler_output`` tensor or list of tensors), [] when the call has none."""
    encoded = inputs.get("mm_encoder_outputs") or {}
    tensors: list[torch.Tensor] = []
    for modality in sorted(encoded):
        out = getattr(encoded[modality], "pooler_output", None)
        items = out if isinstance(out, (list, tuple)) else [out]
        tensors.extend(t for t in items if isinstance(t, torch.Tensor))
    return tensors


def _same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """The same tensor objects (identity, not values: held references, so no id is reused)."""
    return bool(a) and len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


VisionMethod.families = tuple(
    family for family, adapter in ADAPTERS.items() if VisionMethod.supports(adapter)
)


def _model_dtype(cfg: Any, x: torch.Tensor) -> torch.dtype:
    """VisPruner's similarity dtype: the encoder's (official) or float32."""
    return x.dtype if getattr(cfg, "vispruner_dtype", "model") == "model" else torch.float32


declare(
    PRUNING,
    "vispruner",
    "whole method",
    "VisPruner: [CLS]-attention important + similarity-diverse tokens (vision side)",
)


@register("vispruner", "none")
class VisPruner(VisionMethod):
    """VisPruner (ICCV'25): important tokens by [CLS] attention + diverse tokens by similarity removal.

    Official (defaults): every encoder image -- a LLaVA-1.5 image, each LLaVA-NeXT crop including the
    base one, before unpadding -- keeps ``T = int(V * keep_ratio)`` of its V tokens
    (``pact.ops.vision.vispruner_crops``): the top ``floor(T * vispruner_important_ratio)`` by the
    head-mean [CLS] attention of the encoder's selected layer, then the rest thinned by repeated
    bipartite similarity removal on the selected layer's features (the projector input), attention
    and similarity in the model dtype. A visual token stays when the encoder token it was built from
    was selected (tokens LLaVA-NeXT's unpadding removed are lost, as in the official code).

    Options: ``vispruner_scope="sample"`` (one selection over all the sample's visual tokens),
    ``vision_features="projector"`` (similarity on the LLM input embeddings), ``vispruner_dtype=
    "float32"``. With a budget (``target_tokens`` / ``target_ratio``) the sample's budget is split
    over its encoder images in proportion to their visual tokens (largest remainder) and each
    selects among its tokens present in the sequence, so the budget is met exactly.
    """

    name = "vispruner"

    def wants_features(self) -> bool:
        return getattr(self.config, "vision_features", "encoder") == "encoder"

    def signal_layers(self, probe: VisionProbe) -> dict[str, int | SignalSpec]:
        model_dtype = getattr(self.config, "vispruner_dtype", "model") == "model"
        return {"attn": SignalSpec(probe.select_layer(), "mean", model_dtype)}

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        sig = self.token_signals(signals)
        attn = sig["attn"][:, 0]
        n = signals.num_visual
        ratio = float(cfg.vispruner_important_ratio)
        encoder = self.wants_features()
        feats = sig["features"] if encoder else sig["embeds"]
        dtype = _model_dtype(cfg, feats)
        target = target_count(cfg, n)
        if getattr(cfg, "vispruner_scope", "crop") == "sample":
            kept = vispruner_select(attn, feats, self.keep_total(n), ratio, dtype=dtype)
        elif target is None:  # official: per encoder image over all its tokens (before unpadding)
            cap = self.captured(signals)
            crop = cap["crop"].to(attn.device)
            rows = torch.isin(crop, torch.unique(sig["crop"])).nonzero().squeeze(1)
            row_feats = (cap["features"] if encoder else cap["rows"]).to(attn.device)[rows]
            chosen = vispruner_crops(
                cap["attn"].to(attn.device)[rows, 0], row_feats, crop[rows], float(cfg.keep_ratio), ratio,
                dtype=dtype,
            )  # fmt: skip
            selected = torch.zeros(crop.numel(), dtype=torch.bool, device=attn.device)
            selected[rows[chosen]] = True
            kept = selected[sig["row"]].nonzero().squeeze(1)
        else:  # budget: split over the encoder images by their tokens in the sequence
            crops, counts = torch.unique(sig["crop"], return_counts=True)
            budgets = split_budget(target, [c / n for c in counts.tolist()])
            parts = []
            for c, b in zip(crops.tolist(), budgets, strict=True):
                members = (sig["crop"] == c).nonzero().squeeze(1)
                parts.append(members[vispruner_select(attn[members], feats[members], b, ratio, dtype=dtype)])
            kept = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=attn.device)
        return pruned_reduction(kept, n, signals.sizes, attn)


def _image_slices(groups: list[Group]) -> list[tuple[int, int, list[Group]]]:
    """(start, stop, groups) of each image of the sample, in token order."""
    out: list[tuple[int, int, list[Group]]] = []
    for g in groups:
        if out and out[-1][2][0].image == g.image:
            start, _, gs = out[-1]
            out[-1] = (start, g.start + g.size, [*gs, g])
        else:
            out.append((g.start, g.start + g.size, [g]))
    return out


declare(
    CLUSTERING,
    "prumerge",
    "whole method",
    "PruMerge(+): [CLS]-attention outliers absorb similar tokens (vision side)",
)


@register("none", "prumerge")
class PruMerge(VisionMethod):
    """PruMerge / PruMerge+ (``prumerge_plus``), per image as the official code
    (``pact.ops.vision.prumerge``): the tokens whose [CLS] attention is an IQR outlier (or, with a
    budget, the top tokens; PruMerge+ adds the 1-D ``arange`` samples of the flat token list) absorb
    their 32 most key-similar tokens weighted by attention.

    Official (defaults): the attention is ONE head over the full q/k width (scale C^-1/2) of the
    encoder layer after the selected one (the original's layer 23 of 24 on LLaVA-1.5), the keys are
    that layer's; the merge runs on the selected layer's features (the projector input) and the
    model's projector maps the merged rows (and the extra token) into the LLM; the kept tokens are
    emitted most-attended first (``Reduction.order``) and the extra token (attention-weighted sum of
    every pruned token) follows them (``Reduction.extra``, one per image; not with a budget, which
    counts every token the sample keeps).

    Options: ``prumerge_attention="head_mean"`` (mean over the heads), ``vision_features=
    "projector"`` (merge the LLM input embeddings), ``prumerge_sampling="lattice"`` (PruMerge+'s
    samples on a 2-D lattice of the image grid), ``prumerge_extra_token=false``.
    """

    name = "prumerge"
    needs_merge = True
    keys_of = ("attn",)

    def wants_features(self) -> bool:
        return getattr(self.config, "vision_features", "encoder") == "encoder"

    def signal_layers(self, probe: VisionProbe) -> dict[str, int | SignalSpec]:
        heads = "one" if getattr(self.config, "prumerge_attention", "full_width") == "full_width" else "mean"
        return {"attn": SignalSpec(min(probe.select_layer() + 1, len(probe.layers()) - 1), heads)}

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        sig = self.token_signals(signals)
        n = signals.num_visual
        hidden = signals.hidden[signals.visual_mask]
        encoder = self.wants_features()
        feats = sig["features"] if encoder else hidden
        target = target_count(cfg, n)
        plus = bool(getattr(cfg, "prumerge_plus", False))
        lattice = getattr(cfg, "prumerge_sampling", "arange") == "lattice"
        # with a budget the sample keeps exactly K tokens: no extra token on top (equal budgets)
        extra_token = bool(getattr(cfg, "prumerge_extra_token", True)) and target is None
        images = _image_slices(sample_groups(signals))
        parts: list[tuple[int, Reduction]] = []
        rates = [(b - a) / n for a, b, _ in images] if n else []
        budgets = split_budget(target, rates) if target is not None else [None] * len(images)
        for (start, stop, groups), budget in zip(images, budgets, strict=True):
            grid = (groups[0].rows, groups[0].cols) if len(groups) == 1 and lattice else None
            red = prumerge(
                sig["attn"][start:stop, 0],
                sig["attn_keys"][start:stop],
                feats[start:stop],
                plus=plus,
                n_keep=budget,
                grid_shape=grid,
                extra_token=extra_token,
            )
            if encoder:  # the official code merges encoder features, then projects them
                assert self.capture is not None
                red.hidden = self.capture.project(red.hidden)
                if red.extra is not None:
                    red.extra = self.capture.project(red.extra)
            parts.append((start, red))
        return _concat(parts, n, signals.sizes, hidden.device)


def _concat(
    parts: list[tuple[int, Reduction]], n: int, sizes: torch.Tensor, device: torch.device
) -> Reduction:
    """One sample Reduction from per-image Reductions over consecutive token ranges (starting at ``start``).

    Orders are concatenated image by image (each image's tokens stay in its own span); the extra
    tokens of all images follow the sample's kept tokens, in image order.

    Sizes: the per-image sizes count members; with earlier merges (sizes > 1) they are re-weighted by
    the members' current sizes.
    """
    kept, labels, hidden, new_sizes = [], torch.full((n,), -1, dtype=torch.long, device=device), [], []
    orders, extras, scores = [], [], []
    offset = 0
    for start, red in parts:
        r = red.kept.numel()
        orders.append((red.order if red.order is not None else torch.arange(r, device=device)) + offset)
        if red.extra is not None:
            extras.append(red.extra.float())
        if red.scores is not None:
            scores.append(red.scores.float())
        m = red.labels.numel()
        kept.append(red.kept + start)
        lab = red.labels
        labels[start : start + m] = torch.where(lab >= 0, lab + offset, lab)
        if red.hidden is not None:
            hidden.append(red.hidden.float())
        member_sizes = sizes[start : start + m].float()
        valid = lab >= 0
        s = torch.zeros(red.kept.numel(), device=device).index_add_(0, lab[valid], member_sizes[valid])
        new_sizes.append(s)
        offset += red.kept.numel()
    cat_hidden = torch.cat(hidden) if hidden and len(hidden) == len(parts) else None
    order = torch.cat(orders) if orders else torch.zeros(0, dtype=torch.long, device=device)
    in_order = bool(order.numel() == 0 or torch.equal(order, torch.arange(order.numel(), device=device)))
    return Reduction(
        kept=torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=device),
        sizes=torch.cat(new_sizes) if new_sizes else torch.zeros(0, device=device),
        hidden=cat_hidden,
        labels=labels,
        scores=torch.cat(scores) if scores and len(scores) == len(parts) else None,
        order=None if in_order else order,
        extra=torch.cat(extras) if extras else None,
    )


declare(
    PRUNING,
    "hired",
    "whole method",
    "HiRED: base/sub-image budget split + [CLS]-attention top-k (vision side)",
)


@register("hired", "none")
class HiRED(VisionMethod):
    """HiRED (AAAI'25), per image as the official ``HiRED_token_selection``
    (``pact.ops.vision.hired_image_rows``): an image of P encoder crops of V tokens (base image +
    sub-images, before unpadding) gets ``int(P * V * keep_ratio)`` tokens; the base image
    ``min(int(T * hired_alpha), V)``; the sub-images share the rest by how many of the base image's
    top ``int(V (1 - alpha))`` layer-0 [CLS]-attention tokens fall in their contiguous raster chunk
    of the base grid (floored); each crop keeps its top tokens by the [CLS] attention of the
    selected encoder layer, summed over heads. Images without sub-images (LLaVA-1.5, OneVision
    video frames) keep their top ``int(V * keep_ratio)``. A visual token stays when the encoder token
    it was built from was selected: tokens lost to unpadding are not replaced, as in the official code.

    The official code packs the selected tokens without LLaVA-NeXT's image newlines
    (``image_newline=None``): the Reduction asks the engine to remove them (``drop_removable``;
    LLaVA-OneVision's newlines likewise); ``hired_newlines="keep"`` leaves them in place.

    Options: ``hired_layout="spatial"`` (a base token counts for the crop covering it). With a budget
    (``target_tokens`` / ``target_ratio``) the sample's budget is split over its images by token
    count, each image's split uses the same base/sub-image rule with the remainder handed out, over
    the tokens present in the sequence, and a crop short of its share after unpadding passes the rest
    to the image's best remaining tokens: the budget is met exactly.
    """

    name = "hired"
    why_not = (
        "HiRED splits the budget between a base image and its sub-images, a layout only LLaVA-1.5, "
        "LLaVA-NeXT and LLaVA-OneVision (anyres) have"
    )

    @classmethod
    def supports(cls, adapter: Any) -> bool:
        return super().supports(adapter) and adapter.base_and_sub_images

    def signal_layers(self, probe: VisionProbe) -> dict[str, int | SignalSpec]:
        return {"attn": SignalSpec(probe.select_layer(), "sum"), "early": SignalSpec(0, "sum")}

    @staticmethod
    def _crop_grid(crop: torch.Tensor, grid: Group) -> tuple[int, int]:
        """(rows, cols) of the sub-image crops, from the crop ids of the unpadded grid's tokens."""
        crops = torch.unique(crop)
        cols = max(1, torch.unique(crop[: grid.cols]).numel())
        return max(1, crops.numel() // cols), cols

    def _official_image(
        self, sig: dict[str, torch.Tensor], cap: dict[str, torch.Tensor], start: int, groups: list[Group]
    ) -> torch.Tensor:
        """Selected captured rows (global indices) of one image, by the official rule."""
        cfg = self.config
        stop = groups[-1].start + groups[-1].size
        tok_crop = sig["crop"][start:stop]
        crop_all = cap["crop"].to(tok_crop.device)
        grid = next((g for g in groups if g.kind == "grid"), None)
        base = groups[0]
        if grid is None:  # no sub-images: each encoder image keeps its top int(V * rate)
            chosen = []
            for c in torch.unique(tok_crop).tolist():
                rows = (crop_all == c).nonzero().squeeze(1)
                late = cap["attn"].to(rows.device)[rows, 0][None]
                pick = hired_image_rows(late, late[0], float(cfg.keep_ratio), float(cfg.hired_alpha))
                chosen.append(rows[pick[0]])
            return torch.cat(chosen) if chosen else tok_crop.new_zeros(0)
        base_crops = torch.unique(tok_crop[: base.size])
        if base_crops.numel() != 1:
            raise ValueError(
                f"{self.name}: the base image's tokens come from {base_crops.numel()} encoder crops"
            )
        first = int(base_crops[0])
        grid_crop = tok_crop[grid.start - start : grid.start - start + grid.size]
        n_crops = int(grid_crop.max()) - first + 1  # P: the base crop and every sub-image
        rows = [(crop_all == first + i).nonzero().squeeze(1) for i in range(n_crops)]
        v = rows[0].numel()
        if any(r.numel() != v for r in rows):
            raise ValueError(f"{self.name}: the crops of one image have different token counts")
        idx = torch.stack(rows)  # (P, V)
        late = cap["attn"].to(idx.device)[idx, 0]
        early = cap["early"].to(idx.device)[idx[0], 0]
        pick = hired_image_rows(
            late,
            early,
            float(cfg.keep_ratio),
            float(cfg.hired_alpha),
            layout=getattr(cfg, "hired_layout", "raster"),
            base_grid=(base.rows, base.cols),
            crop_grid=self._crop_grid(grid_crop, grid),
        )
        return idx[pick]

    def _budget_image(
        self, sig: dict[str, torch.Tensor], start: int, groups: list[Group], budget: int
    ) -> torch.Tensor:
        """Kept token indices (sample-level) of one image under a budget: exactly ``budget``."""
        stop = groups[-1].start + groups[-1].size
        late = sig["attn"][start:stop, 0]
        base = groups[0]
        grid = next((g for g in groups if g.kind == "grid"), None)
        if grid is None:
            return topk_indices(late, min(budget, late.numel())) + start
        crop = sig["crop"][start:stop]
        grid_crops = crop[grid.start - start : grid.start - start + grid.size]
        crops = torch.unique(grid_crops)  # ascending = row-major crop order
        early = sig["early"][start : start + base.size, 0]
        shares = hired_crop_scores(
            early,
            (base.rows, base.cols),
            self._crop_grid(grid_crops, grid),
            float(self.config.hired_alpha),
            layout=getattr(self.config, "hired_layout", "raster"),
        )
        if shares.numel() != crops.numel():  # a crop lost to unpadding: share uniformly
            shares = torch.ones(crops.numel(), device=late.device)
        budgets = hired_budgets(
            shares, budget, float(self.config.hired_alpha), base.size, base_tokens=base.size, exact=True
        ).tolist()
        chosen = torch.zeros(stop - start, dtype=torch.bool, device=late.device)
        chosen[topk_indices(late[: base.size], min(budgets[0], base.size))] = True
        for c, b in zip(crops.tolist(), budgets[1:], strict=True):
            members = (crop == c).nonzero().squeeze(1)
            members = members[members >= base.size]
            pick = topk_indices(late[members], min(int(b), members.numel()))
            chosen[members[pick]] = True
        short = budget - int(chosen.sum())
        if short > 0:  # crops smaller than their share after unpadding: fill with the best remaining
            rest = (~chosen).nonzero().squeeze(1)
            chosen[rest[topk_indices(late[rest], min(short, rest.numel()))]] = True
        return chosen.nonzero().squeeze(1) + start

    def reduce(self, signals: Signals) -> Reduction:
        sig = self.token_signals(signals)
        n = signals.num_visual
        device = signals.hidden.device
        images = _image_slices(sample_groups(signals))
        target = target_count(self.config, n)
        if target is None:
            cap = self.captured(signals)
            rows = [self._official_image(sig, cap, a, gs) for a, _, gs in images]
            selected = torch.zeros(cap["crop"].numel(), dtype=torch.bool, device=device)
            if rows:
                selected[torch.cat(rows).to(device)] = True
            kept_all = selected[sig["row"]].nonzero().squeeze(1)
        else:
            budgets = split_budget(target, [(b - a) / n for a, b, _ in images] if n else [])
            kept = [
                self._budget_image(sig, a, gs, bud) for (a, _, gs), bud in zip(images, budgets, strict=True)
            ]
            kept_all = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=device)
        red = pruned_reduction(kept_all, n, signals.sizes, sig["attn"][:, 0])
        # The official code packs the selected tokens without image newlines (image_newline=None).
        red.drop_removable = getattr(self.config, "hired_newlines", "remove") == "remove"
        return red
