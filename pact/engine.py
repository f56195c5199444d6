"""The hooks that apply a reduction method to a stock Hugging Face vision-language model.

Nothing is patched or replaced: ``Engine.install`` registers per-instance forward (pre-)hooks and
``Engine.remove`` takes them off again, after which the model is the stock model bit for bit.

    VLM (pre)             ``_on_model_call``, every call: prefill (empty/absent cache) or cached
                          step; a prefill starts a new CallState and finds the visual patch tokens
                          from input_ids
    text model (pre)      ``_capture_positions``: the rotary position ids (A, B, T) of the prefill
                          (renumber: of each cached step too)
    layer i (pre)         ``_reduce_and_feed_hook(i)``: i a reduction layer: ask the method, per
                          sample, for a Reduction and build the reduced, left-padded batch; i >= L:
                          feed the layer the reduced hidden states, cos/sin, key bias (sdpa) or 4-D
                          mask; cached steps: the mask over the layer's own cache length (key bias
                          of the reduced prefix, 0 for later tokens)
    text model (post)     ``_restore_length``: prefill, scatter the last hidden state back to the
                          input length

The model-free bookkeeping of a step (per-sample plans, left-padded packing, the new Layout, step
records in original indices) is pure functions in ``pact.packing``; this module calls the model
(method, queries/keys, rotary tables, masks) and keeps the per-call state: ``CallState`` = what is
fixed for the prefill (``Prefill``), what the reductions produce (``Reduced``: layout, per-layer
key bias, ``ReductionRecord``s on device) and where the current call is (``CallProgress``).

Why the parts look as they do:
- Kept tokens keep their original rotary positions by gathering the cos/sin rows the model already
  computed (1-D RoPE and Qwen's M-RoPE alike); a merged token sits at its center's slot and position.
  A Reduction may reorder the kept visual tokens within their slots (``order``), insert new
  tokens after them (``extra``) and remove the slots the adapter marks removable
  (``drop_removable``; ``ModelAdapter.removable_mask``: image newlines, which HiRED's official code
  leaves out); each sample's new order is one ``pact.packing.SamplePlan``.
- position_mode="renumber" on 1-D RoPE: layers >= L get contiguous positions over each sample's
  reduced sequence (cos/sin recomputed with the model's rotary module) and, in cached steps, the
  stock position ids minus the tokens removed up to that layer, so decoding continues from the
  reduced length there while layers < L (whole prompt in their cache) keep the stock ones. On
  M-RoPE it keeps the (t, h, w) ids and decodes stock, as the official Qwen ports do (DART's
  Qwen2-VL / Qwen2.5-VL code, LLMC's VisionZip / VisPruner Qwen2.5-VL hooks: the full prompt's ids
  sliced to the kept tokens, rope_deltas of the full prompt; = center).
- Layers >= L see the key bias (padding -inf + log(size) per key when proportional attention is
  on). On sdpa (default) it travels as the keyword ``pact_key_bias`` to the attention function
  registered as ``pact.attention_backend.PACT_SDPA`` (the text config is switched to it at install,
  back at remove), which folds it into one extra q/k column and keeps SDPA's ``is_causal`` kernels;
  an explicit 4-D float mask would cost the causal fast path (~3x per layer on CPU). Eager, and
  sdpa after ``Engine.set_fast_sdpa(False)`` (or for a cached step), get an explicit mask
  (causal + bias) from ``pact.ops.attention.build_attention_mask``. FlashAttention gets a 2-D
  padding mask (no bias possible).
- Otherwise cached steps keep the unreduced timeline: generate's position ids (and the stock ones,
  which read layer 0's cache length) continue from the unreduced prompt length. When layer 0 itself is
  reduced the engine supplies the position ids the stock model would have computed, and the mask
  of every layer, so nothing depends on layer 0's cache length.
- The logits keep the input's sequence length: after the last layer the engine scatters hidden
  states back. A removed position takes the hidden state of its representative: the merged token of
  its cluster, or, for a pruned-and-dropped token, the nearest kept token before it (the first kept
  token if none). Those rows are placeholders: their logits are not predictions of the model.
- Per-call state lives in one ``CallState`` replaced at every prefill, so nothing leaks from one
  prompt to the next.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pact import attention_backend
from pact.methods.base import Method, Signals
from pact.models.base import LayerAttention, ModelAdapter
from pact.ops.attention import build_attention_mask, build_block_window_mask
from pact.ops.merge import cluster_means
from pact.ops.reduction import Reduction
from pact.packing import (
    Layout,
    ReductionRecord,
    SamplePlan,
    first_positions,
    gather_layout,
    initial_layout,
    pack_batch,
    pack_hidden,
    plan_sample,
    renumbered_positions,
    step_record,
)

SUPPORTED_ATTENTION = ("eager", "sdpa")


# ---------------------------------------------------------------------------------------------------
# Records and statistics


@dataclass
class ReductionStats:
    """Reduction of the last prefill (one ``forward``/``generate`` call with a fresh cache).

    Attributes:
        visual_before: per sample, visual patch tokens entering the first reduction layer.
        visual_after: per sample, visual tokens left after the last reduction step, new tokens
            added by a step (``Reduction.extra``, e.g. PruMerge's merged token) included.
        layers: decoder layers where a reduction step ran (empty: no reduction happened).
        seconds_reducing: wall time spent deciding and applying the reduction (all steps).
        records: per step, per sample ``ReductionRecord`` (None for a sample without visual tokens).
    """

    visual_before: list[int] = field(default_factory=list)
    visual_after: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    seconds_reducing: float = 0.0
    records: list[list[ReductionRecord | None]] = field(default_factory=list)

    @property
    def layer(self) -> int | None:
        """The first reduction layer (None when nothing was reduced)."""
        return self.layers[0] if self.layers else None

    @property
    def reduction_ratio(self) -> float:
        """1 - sum(after) / sum(before), token-weighted over the batch (0.0 without visual tokens)."""
        before = sum(self.visual_before)
        return 0.0 if before == 0 else 1.0 - sum(self.visual_after) / before


class _Timer:
    """Accumulates seconds without forcing a device sync: CUDA events when the tensors are on a
    GPU (read when the stats are asked for), ``perf_counter`` otherwise."""

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self.events: list[tuple[Any, Any]] = []
        self._start: Any = None

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._start = ev
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if isinstance(self._start, float):
            self.cpu_seconds += time.perf_counter() - self._start
        elif self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
        self._start = None

    def seconds(self) -> float:
        total = self.cpu_seconds
        for start, end in self.events:
            end.synchronize()
            total += start.elapsed_time(end) / 1000.0
        return total


# ---------------------------------------------------------------------------------------------------
# Per-call state


@dataclass
class Prefill:
    """What is fixed for one prefill and its cached continuation (set when the prefill starts; the
    positions when the text model is called)."""

    active: bool = False  # a reduction runs in this prefill / applies to its cached steps
    fast: bool = False  # layers >= L get the key bias as ``pact_key_bias`` (causal SDPA), no mask
    batch: int = 0
    length: int = 0  # T, the prefill's input length
    valid: torch.Tensor | None = None  # (B, T) bool, attention_mask of the prefill
    candidates: torch.Tensor | None = None  # (B, T) bool visual patch tokens
    # (B, T) bool non-candidate slots a Reduction may remove (``drop_removable``: image newlines)
    removable: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # (A, B, T) rotary position ids of the prefill
    blocks: torch.Tensor | None = None  # (B, T) long image blocks (ModelAdapter.attention_blocks) or None
    visual_before: list[int] = field(default_factory=list)  # per sample, visual patch tokens
    inputs: dict[str, Any] = field(default_factory=dict)  # the call's keyword arguments, for methods


@dataclass
class Reduced:
    """What the reduction steps of a prefill produce, read by later layers and cached steps."""

    layout: Layout | None = None  # None until the first reduction step
    original_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, T, head_dim) unreduced cos/sin
    first_position: torch.Tensor | None = None  # (B,) stock position of each sample's first token
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, T, D) of input_layers()
    layer_bias: dict[int, torch.Tensor] = field(default_factory=dict)  # key bias of each layer's prefix
    layer_valid: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, R_i) non-padding prefix keys
    records: list[list[ReductionRecord | None]] = field(default_factory=list)  # per step, per sample
    layers_done: list[int] = field(default_factory=list)
    timer: _Timer = field(default_factory=_Timer)
    injection: FollowedInjection | None = None  # visual features added after some layers (DeepStack)
    # per-layer rules (ModelAdapter.layer_attention): each layer's rotary positions and image blocks
    # (B, R_i), and the current layout's cos/sin per rotary table and slot blocks (reset with every
    # new layout)
    layer_positions: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    rule_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    slot_blocks: torch.Tensor | None = None


@dataclass
class CallProgress:
    """Where the current forward call is on the unreduced timeline (updated every call)."""

    is_prefill: bool = True
    seen: int = 0  # tokens of the unreduced timeline processed so far (prefill + cached steps)
    call_start: int = 0  # cached step: tokens of the unreduced timeline seen before this call
    mask2d: torch.Tensor | None = None  # 2-D attention mask of the current call (all seen tokens)
    # position_mode="renumber" (1-D RoPE), cached step: the step's stock position ids (1, B, q) and,
    # per reduction step k, the cos/sin of the renumbered ones fed to layers between reduction k and
    # k+1 (layers < L keep the stock ones: their cache holds the unreduced prompt)
    decode_positions: torch.Tensor | None = None
    decode_rope: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # per-layer rules: the stock position ids (B, n) of every token after the prefill, for windows
    new_positions: torch.Tensor | None = None


@dataclass
class FollowedInjection:
    """Visual features the text model adds after some decoder layers (``VisualInjection``, e.g.
    Qwen3-VL's DeepStack), taken over by the engine for a reduced prefill and kept in step with its
    layout.

    features: decoder layer k -> (M, D) rows added after layer k (the model's tensors; a reduction
        step writes merged rows into a copy, see ``owned``).
    rows: (B, R) long, for each slot of the current layout the row of ``features`` it receives, -1
        for none (text, padding, new tokens). A merged token's row is its center's, overwritten with
        the merged feature; removed tokens' rows are no longer referenced.
    owned: layers whose ``features`` tensor is the engine's copy (written in place).
    """

    features: dict[int, torch.Tensor]
    rows: torch.Tensor
    owned: set[int] = field(default_factory=set)


@dataclass
class CallState:
    """Everything about the current prefill and its cached continuation (replaced every prefill)."""

    prefill: Prefill = field(default_factory=Prefill)
    reduced: Reduced = field(default_factory=Reduced)
    call: CallProgress = field(default_factory=CallProgress)
    context: dict[str, Any] = field(default_factory=dict)  # the method's per-prefill scratch space


# ---------------------------------------------------------------------------------------------------
# Engine


class Engine:
    """Installs and runs the reduction hooks of one model instance."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, config: Any, method: Method | None) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self.method = method
        num_layers = len(adapter.layers)
        self.reduce_layers: list[int] = sorted(set(method.layers(num_layers))) if method else []
        self.first_layer = self.reduce_layers[0] if self.reduce_layers else None
        self.input_layers: set[int] = set(method.input_layers(num_layers)) if method else set()
        # Linear-attention layers (hybrid decoders, e.g. Qwen3.5): no KV cache, a 2-D padding mask.
        # ``length_layer`` is the layer whose cache length ``DynamicCache.get_seq_length()`` reports
        # (its first attention layer), which the stock model reads for decode positions and masks.
        self.linear_layers: frozenset[int] = adapter.linear_attention_layers()
        self.length_layer = next((j for j in range(num_layers) if j not in self.linear_layers), 0)
        impl = adapter.attn_implementation
        self.flash = impl.startswith("flash_attention")
        self.proportional = bool(getattr(config, "proportional_attention", True)) and not self.flash
        # sdpa: carry the key bias in an extra q/k column instead of a 4-D mask (keeps is_causal).
        fast_ok = impl in ("sdpa", attention_backend.PACT_SDPA)
        self.fast_sdpa = fast_ok and bool(getattr(config, "sdpa_fast_path", True))
        # Layers that differ in rotary table and mask (Gemma 3): each reduced layer gets its own
        # cos/sin and an explicit mask (image blocks cannot ride on SDPA's is_causal fast path).
        self.layer_rules: list[LayerAttention] | None = adapter.layer_attention()
        if self.layer_rules is not None:
            self.fast_sdpa = False
        # position_mode="renumber" changes positions on 1-D RoPE only: on M-RoPE (Qwen2-VL/2.5-VL) the
        # official Qwen ports of vision-side methods keep each kept token's (t, h, w) ids, which is
        # what "center" does (DESIGN.md section 3, docs/CONFIGDOC.md).
        self.renumber = getattr(config, "position_mode", "center") == "renumber" and not adapter.mrope
        self._switched: list[Any] = []  # configs switched to PACT_SDPA by install
        self.handles: list[Any] = []
        self.state = CallState()
        # Engine.stats hands out CPU copies of the records, made once per prefill
        self._cpu_records: list[list[ReductionRecord | None]] = []
        self._cpu_records_of: Reduced | None = None

    # --- install / remove ---------------------------------------------------------------------

    def install(self) -> None:
        a = self.adapter
        try:
            self.handles.append(a.vlm.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            self.handles.append(
                a.text_model.register_forward_pre_hook(self._capture_positions, with_kwargs=True)
            )
            self.handles.append(a.text_model.register_forward_hook(self._restore_length, with_kwargs=True))
            for i, layer in enumerate(a.layers):
                self.handles.append(
                    layer.register_forward_pre_hook(self._reduce_and_feed_hook(i), with_kwargs=True)
                )
                if a.injects_visual_features:
                    self.handles.append(layer.register_forward_hook(self._inject_hook(i)))
            if self.method is not None:
                self.handles.extend(self.method.install(self.model, a))
                if self.fast_sdpa:
                    self._switched = attention_backend.switch_to_fast(a)
        except BaseException:
            # e.g. the method refuses this model family: leave the model exactly as it was
            self.remove()
            raise

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        attention_backend.switch_back(self._switched)
        self._switched = []
        self.state = CallState()

    def set_fast_sdpa(self, enabled: bool) -> None:
        """Switch the sdpa fast path (key bias in an extra q/k column, causal kernels) on or off;
        off: layers >= L get the explicit 4-D float mask, as on eager. No-op on other backends."""
        if (
            enabled
            and self.layer_rules is None
            and not self._switched
            and self.handles
            and self.method is not None
        ):
            impl = self.adapter.attn_implementation
            if impl in ("sdpa", attention_backend.PACT_SDPA):
                self.fast_sdpa = True
                self._switched = attention_backend.switch_to_fast(self.adapter)
        elif not enabled:
            self.fast_sdpa = False
            attention_backend.switch_back(self._switched)
            self._switched = []

    # --- read-only views ----------------------------------------------------------------------

    @property
    def layout(self) -> Layout | None:
        """The batch's current token layout after the last prefill's reductions (None before the
        first reduction step of a prefill, or without reduction). For tests and tools: read only."""
        return self.state.reduced.layout

    def stats(self) -> ReductionStats:
        """The reduction of the last prefill; records are CPU copies (made once per prefill)."""
        pre, red = self.state.prefill, self.state.reduced
        if len(self._cpu_records) != len(red.records) or self._cpu_records_of is not red:
            self._cpu_records = [[None if r is None else r.to_cpu() for r in step] for step in red.records]
            self._cpu_records_of = red
        after = list(pre.visual_before)
        extra = [0] * len(after)
        for step in red.records:  # the last step that saw a sample's visual tokens decides
            for b, rec in enumerate(step):
                if rec is not None:
                    after[b] = len(rec.kept)
                    extra[b] += rec.extra  # new tokens are no candidates of later steps: they stay
        after = [a + e for a, e in zip(after, extra, strict=True)]
        return ReductionStats(
            visual_before=list(pre.visual_before),
            visual_after=after,
            layers=list(red.layers_done),
            seconds_reducing=red.timer.seconds(),
            records=self._cpu_records,
        )

    # --- hooks --------------------------------------------------------------------------------

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """VLM pre-hook, every call: a prefill (empty or absent cache) starts a new ``CallState``; a
        cached step advances the unreduced timeline (and supplies position ids when layer 0 is
        reduced)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and not (isinstance(mask2d, torch.Tensor) and mask2d.ndim == 2):
            mask2d = None if not self.state.prefill.active else mask2d
            if mask2d is not None:
                raise ValueError("pact needs a 2-D attention_mask (B, T) (got a prepared 4-D mask or a dict)")
        if past == 0:
            self._start_prefill(input_ids, mask2d, cache, kwargs)
            return args, kwargs
        pre, call = self.state.prefill, self.state.call
        call.is_prefill = False
        q = int(input_ids.shape[1]) if input_ids is not None else int(kwargs["inputs_embeds"].shape[1])
        start = call.seen
        call.call_start = start
        call.decode_positions = None
        call.decode_rope = {}
        call.seen += q
        call.mask2d = mask2d
        if pre.active and self.first_layer <= self.length_layer and kwargs.get("position_ids") is None:
            # The cache length the stock model reads (layer 0's, or a hybrid decoder's first
            # attention layer's) is reduced, so the stock position ids (arange + that length) would
            # restart early; give the ones of the unreduced timeline.
            device = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).device
            b = int((input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0])
            kwargs["position_ids"] = self.adapter.decode_position_ids(start, q, b, device)
        return args, kwargs

    def _start_prefill(self, input_ids: torch.Tensor | None, mask2d: Any, cache: Any, kwargs: dict) -> None:
        if self.method is not None and self.state.context:
            self.method.finish(self.state.context)
        st = CallState()
        self.state = st
        pre, call = st.prefill, st.call
        if input_ids is None:
            embeds = kwargs.get("inputs_embeds")
            pre.batch, pre.length = (
                (int(embeds.shape[0]), int(embeds.shape[1])) if embeds is not None else (0, 0)
            )
            call.seen = pre.length
            pre.visual_before = [0] * pre.batch
            return
        B, T = input_ids.shape
        pre.batch, pre.length, call.seen = int(B), int(T), int(T)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask2d is None else mask2d.bool()
        pre.valid, call.mask2d = valid, mask2d
        if self.method is None or not getattr(self.config, "reduction", True):
            pre.visual_before = [0] * pre.batch
            return
        cand = self.adapter.candidate_mask(input_ids, kwargs) & valid
        removable = self.adapter.removable_mask(input_ids, kwargs) & valid & ~cand
        counts = cand.sum(1).tolist()
        pre.visual_before = [int(c) for c in counts]
        if sum(counts) == 0:
            return  # text only: stock behaviour
        if cache is not None and not _is_dynamic_cache(cache):
            raise ValueError(
                "pact needs a DynamicCache (per-layer lengths differ after reduction); "
                f"got {type(cache).__name__}"
            )
        pre.active = True
        # Checked per call: another model sharing this config may have switched it back.
        pre.fast = self.fast_sdpa and self.adapter.attn_implementation == attention_backend.PACT_SDPA
        pre.candidates = cand
        pre.removable = removable if bool(removable.any()) else None
        if self.layer_rules is not None:
            pre.blocks = self.adapter.attention_blocks(input_ids, kwargs)
        pre.inputs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "past_key_values")}
        pre.inputs["input_ids"] = input_ids
        self.method.prepare(self.model, self.adapter, pre.inputs, st.context)

    def _capture_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Text-model pre-hook: store the prefill's rotary position ids (and, under renumber, each
        cached step's); a cached step with layer 0 reduced also gets the engine's mask here, so the
        stock mask never reads layer 0's reduced cache length."""
        pre, call, red = self.state.prefill, self.state.call, self.state.reduced
        if not pre.active:
            return args, kwargs
        if call.is_prefill:
            embeds = kwargs.get("inputs_embeds")
            pos = self.adapter.normalize_positions(kwargs.get("position_ids"), pre.batch)
            if pos is None:  # the stock default of a prefill: 0..T-1
                pos = torch.arange(pre.length, device=embeds.device)[None, None].expand(
                    3 if self.adapter.mrope else 1, pre.batch, pre.length
                )
            pre.positions = pos
            if self.adapter.injects_visual_features:
                self._take_injection(kwargs)
        else:
            if self.layer_rules is not None:
                self._record_new_positions(kwargs)
            elif self.first_layer <= self.length_layer:
                # Every attention layer's mask is ours: skip the stock mask, which would read the
                # reduced cache length of layer 0 (or of a hybrid decoder's first attention layer). A
                # 4-D mask (or flash's 2-D one, sized to the reduced cache) is used as given; the layer
                # hooks then set each layer's own attention inputs (linear layers: their 2-D mask).
                cache = kwargs.get("past_key_values")
                kwargs["attention_mask"] = self._decode_inputs(
                    self.length_layer, cache, kwargs["inputs_embeds"], allow_fast=False
                )[0]
            if self.renumber and red.layout is not None:
                # generate's (B, q) position ids, or the stock default on the unreduced timeline
                embeds = kwargs["inputs_embeds"]
                pos = self.adapter.normalize_positions(kwargs.get("position_ids"), pre.batch)
                if pos is None:
                    q = int(embeds.shape[1])
                    pos = self.adapter.decode_position_ids(call.call_start, q, pre.batch, embeds.device)[None]
                call.decode_positions = pos.to(embeds.device)
        return args, kwargs

    def _renumbered_decode_rope(self, i: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, q, head_dim) of a cached step's tokens in layer i >= L under renumber: the
        step's stock position ids (unreduced timeline) minus, per sample, the tokens the reductions
        up to layer i removed (net of new tokens), so decoding continues right after the prompt as
        layer i saw it renumbered. Computed once per reduction step and shared by its layers."""
        pre, call, red = self.state.prefill, self.state.call, self.state.reduced
        step = bisect.bisect_right(self.reduce_layers, i)
        kind = self.layer_rules[i].rotary if self.layer_rules is not None else None
        if (step, kind) not in call.decode_rope:
            removed = pre.valid.sum(1) - red.layer_valid[i].sum(1)  # (B,)
            pos = call.decode_positions - removed.to(hidden.device).view(1, -1, 1)
            call.decode_rope[step, kind] = (
                self.adapter.rotary(hidden, pos)
                if kind is None
                else self.adapter.layer_rotary(kind, hidden, pos)
            )
        return call.decode_rope[step, kind]

    def _restore_length(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Text-model post-hook of a reduced prefill: scatter the last hidden state (B, R, D) back to
        the input length (B, T, D), every position taking its representative's row."""
        st = self.state
        lay = st.reduced.layout
        if not (st.prefill.active and st.call.is_prefill and lay is not None):
            return output
        if self.method is not None:
            self.method.finish(st.context)
        hidden = output.last_hidden_state  # (B, R, D)
        idx = lay.orig_to_slot[..., None].expand(-1, -1, hidden.shape[-1])
        output.last_hidden_state = hidden.gather(1, idx)
        return output

    def _reduce_and_feed_hook(self, i: int) -> Any:
        """Pre-hook of decoder layer i: prefill, reduce when i is a reduction layer and feed layers
        >= L their reduced inputs (hidden states, cos/sin, mask or key bias); cached step, feed
        layers >= L the mask over their own cache (and renumbered cos/sin)."""

        def hook(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            pre, red = self.state.prefill, self.state.reduced
            if not pre.active or self.first_layer is None:
                return args, kwargs
            if self.state.call.is_prefill:
                hidden = args[0] if args else kwargs["hidden_states"]
                if i in self.input_layers and red.layout is None:
                    red.layer_inputs[i] = hidden
                if i < self.first_layer:
                    return args, kwargs
                if i in self.reduce_layers:
                    hidden = self._reduce(i, layer, hidden, kwargs)
                    if args:
                        args = (hidden, *args[1:])
                    else:
                        kwargs["hidden_states"] = hidden
                lay = red.layout
                if i in self.linear_layers:
                    return self._linear_layer_inputs(i, args, kwargs)
                if self.layer_rules is not None:
                    return self._rule_layer_inputs(i, hidden, args, kwargs)
                kwargs["position_embeddings"] = (lay.cos, lay.sin)
                kwargs["attention_mask"] = lay.mask
                if pre.fast:
                    kwargs["pact_key_bias"] = self._bias(lay.key_bias, lay.slot_orig >= 0)
                kwargs["position_ids"] = None
                red.layer_bias[i] = lay.key_bias
                red.layer_valid[i] = lay.slot_orig >= 0
                return args, kwargs
            if i in self.linear_layers:
                return self._linear_layer_inputs(i, args, kwargs)
            if self.layer_rules is not None:
                return self._rule_decode_inputs(i, args, kwargs)
            if i >= self.first_layer:
                hidden = args[0] if args else kwargs["hidden_states"]
                mask, bias = self._decode_inputs(i, kwargs.get("past_key_values"), hidden)
                kwargs["attention_mask"] = mask
                if bias is not None:
                    kwargs["pact_key_bias"] = bias
                if self.state.call.decode_positions is not None:
                    kwargs["position_embeddings"] = self._renumbered_decode_rope(i, hidden)
                if self.flash:
                    kwargs["position_ids"] = None
            return args, kwargs

        return hook

    # --- linear-attention layers (hybrid decoders) ---------------------------------------------

    def _linear_layer_inputs(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Inputs of a linear-attention layer i (``ModelAdapter.linear_attention_layers``).

        Such a layer (Gated DeltaNet: a short causal conv and a recurrent state) has no softmax, no
        positions and no KV cache; its only mask is the 2-D padding mask (B, q) it multiplies its
        input rows by, so that left padding never enters the conv or the recurrence. Prefill, i >= L:
        the reduced layout's non-padding slots, so the reduced sequence is what its conv and
        recurrence see, the removed tokens as if never there, and its cached states are those of
        the reduced sequence. Cached step (any i): the step's last q columns of the 2-D mask (None
        for a single token, as stock), set here because the text-level mask may be the engine's 4-D
        one. Where stock passes None for a mask of all ones, this passes the mask: multiplying by
        ones is exact, and checking would cost a host sync per layer. The key bias (proportional
        attention) does not apply: there is no softmax to add it to."""
        call, red = self.state.call, self.state.reduced
        if call.is_prefill:
            valid = red.layout.slot_orig >= 0  # (B, R)
            red.layer_valid[i] = valid
            red.layer_bias[i] = red.layout.key_bias
            kwargs["position_embeddings"] = (red.layout.cos, red.layout.sin)  # unused, kept consistent
            kwargs["attention_mask"] = valid
            kwargs["position_ids"] = None
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]
        q = int(hidden.shape[1])
        mask2d = call.mask2d
        if q == 1 or mask2d is None:
            kwargs["attention_mask"] = None
        else:
            kwargs["attention_mask"] = mask2d[:, -q:].to(hidden.device).contiguous()
        return args, kwargs

    # --- layers with their own rotary table and mask (ModelAdapter.layer_attention: Gemma 3) ----

    def _rule_rope(self, kind: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, R, head_dim) of rotary table ``kind`` at the current layout's positions
        (computed once per layout and table: a kept token gets exactly its stock rows)."""
        red = self.state.reduced
        if kind not in red.rule_tables:
            red.rule_tables[kind] = self.adapter.layer_rotary(kind, hidden, red.layout.positions)
        return red.rule_tables[kind]

    def _slot_blocks(self) -> torch.Tensor:
        """(B, R) long image block of each slot of the current layout (-1: text, padding). A new token
        (``Reduction.extra``) takes the block of the slot it was placed after. Computed once per
        layout (every layer >= L and every sample's scoring read it)."""
        pre, red = self.state.prefill, self.state.reduced
        if red.slot_blocks is None:
            slot_orig = red.layout.slot_orig
            if pre.blocks is None:
                red.slot_blocks = torch.full_like(slot_orig, -1)
            else:
                blocks = pre.blocks.to(slot_orig.device)
                red.slot_blocks = torch.where(slot_orig >= 0, blocks.gather(1, slot_orig.clamp(min=0)), -1)
        return red.slot_blocks

    def _rule_layer_inputs(
        self, i: int, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        """Prefill inputs of layer i >= L under per-layer rules: its rotary table at the layout's
        positions and its mask (causal OR same image block, AND its window over those positions)."""
        red, rule = self.state.reduced, self.layer_rules[i]
        lay = red.layout
        valid = lay.slot_orig >= 0
        positions, blocks = lay.positions[0], self._slot_blocks()
        kwargs["position_embeddings"] = self._rule_rope(rule.rotary, hidden)
        kwargs["attention_mask"] = build_block_window_mask(
            self._bias(lay.key_bias, valid),
            blocks,
            positions,
            int(hidden.shape[1]),
            rule.window,
            hidden.dtype,
        )
        kwargs["position_ids"] = None
        red.layer_bias[i], red.layer_valid[i] = lay.key_bias, valid
        red.layer_positions[i], red.layer_blocks[i] = positions, blocks
        return args, kwargs

    def _record_new_positions(self, kwargs: dict) -> None:
        """Text-model pre-hook of a cached step under per-layer rules: append the step's stock
        position ids (unreduced timeline) to those of the tokens after the prefill (their windows)."""
        pre, call = self.state.prefill, self.state.call
        embeds = kwargs["inputs_embeds"]
        pos = self.adapter.normalize_positions(kwargs.get("position_ids"), pre.batch)
        if pos is None:
            pos = self.adapter.decode_position_ids(
                call.call_start, int(embeds.shape[1]), pre.batch, embeds.device
            )
        else:
            pos = pos[0]
        pos = pos.to(embeds.device)
        call.new_positions = pos if call.new_positions is None else torch.cat([call.new_positions, pos], 1)
        if self.renumber and self.state.reduced.layout is not None:
            call.decode_positions = pos[None]
        # every layer's mask is the engine's (the stock one would read reduced cache lengths)
        kwargs["attention_mask"] = None

    def _rule_decode_inputs(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Cached step, any layer i under per-layer rules: the mask over the keys the layer's cache
        returns (``get_mask_sizes``: a sliding-window cache keeps only its last W - 1 rows), i.e. the
        last of: the layer's prefix (reduced for i >= L), then every later token; causal OR same image
        block, AND the window over rotary positions (layers >= L under renumber: the renumbered ones)."""
        pre, call, red = self.state.prefill, self.state.call, self.state.reduced
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("past_key_values")
        rule = self.layer_rules[i]
        q, dev = int(hidden.shape[1]), hidden.device
        if i in red.layer_bias:  # a layer >= L: its reduced prefix
            prefix_valid = red.layer_valid[i]
            prefix_bias = self._bias(red.layer_bias[i], prefix_valid)
            prefix_pos, prefix_blocks = red.layer_positions[i], red.layer_blocks[i]
        else:
            prefix_valid = pre.valid.to(dev)
            prefix_bias = torch.where(prefix_valid, 0.0, float("-inf"))
            prefix_pos = pre.positions[0].to(dev)
            prefix_blocks = pre.blocks.to(dev) if pre.blocks is not None else torch.full_like(prefix_pos, -1)
        layer_cache = cache.layers[i]
        past = int(layer_cache.get_seq_length())
        n_new = past + q - prefix_bias.shape[1]
        if n_new < q or call.new_positions is None or call.new_positions.shape[1] < n_new:
            raise RuntimeError(f"layer {i}: cache holds {past} keys, fewer than the prefill's prefix")
        if call.mask2d is not None and call.mask2d.shape[1] >= n_new:
            new_valid = call.mask2d[:, -n_new:].to(dev).bool()
        else:
            new_valid = torch.ones(pre.batch, n_new, dtype=torch.bool, device=dev)
        new_pos = call.new_positions[:, -n_new:].to(dev)
        if self.renumber and i in red.layer_bias:
            new_pos = new_pos - (pre.valid.to(dev).sum(1) - prefix_valid.sum(1)).view(-1, 1)
            kwargs["position_embeddings"] = self._renumbered_decode_rope(i, hidden)
        bias = torch.cat([prefix_bias.to(dev), torch.where(new_valid, 0.0, float("-inf"))], 1)
        positions = torch.cat([prefix_pos.to(dev), new_pos], 1)
        blocks = torch.cat([prefix_blocks.to(dev), torch.full_like(new_pos, -1)], 1)
        kv_length = int(layer_cache.get_mask_sizes(q)[0])  # the keys the attention receives
        bias, positions, blocks = bias[:, -kv_length:], positions[:, -kv_length:], blocks[:, -kv_length:]
        kwargs["attention_mask"] = build_block_window_mask(
            bias, blocks, positions, q, rule.window, hidden.dtype
        )
        return args, kwargs

    # --- masks --------------------------------------------------------------------------------

    def _bias(self, key_bias: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """(B, K) float32 bias added to every logit on a key: log(size) (proportional attention) or
        0, -inf for padding keys."""
        bias = key_bias if self.proportional else torch.where(key_valid, 0.0, float("-inf"))
        return bias.float()

    def _mask(self, key_bias: torch.Tensor, key_valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> Any:
        """The attention_mask of a layer >= L: 4-D float (eager/sdpa) or 2-D bool padding (flash)."""
        if self.flash:
            return None if bool(key_valid.all()) else key_valid
        return build_attention_mask(self._bias(key_bias, key_valid), q_len, dtype)

    def _decode_inputs(
        self, i: int, cache: Any, hidden: torch.Tensor, allow_fast: bool = True
    ) -> tuple[Any, torch.Tensor | None]:
        """(attention_mask, pact_key_bias) of layer i for a cached step: the layer's reduced prefix,
        then every later token. Fast path (as many queries as keys): (None, bias); otherwise
        (mask, None)."""
        pre, call, red = self.state.prefill, self.state.call, self.state.reduced
        q = int(hidden.shape[1])
        past = int(cache.get_seq_length(i)) if cache is not None else 0
        prefix_bias, prefix_valid = red.layer_bias[i], red.layer_valid[i]
        n_new = past + q - prefix_bias.shape[1]
        if n_new < q:
            raise RuntimeError(f"layer {i}: cache holds {past} keys, fewer than the reduced prefix")
        if call.mask2d is not None and call.mask2d.shape[1] >= n_new:
            new_valid = call.mask2d[:, -n_new:].to(prefix_valid.device).bool()
        else:
            new_valid = torch.ones(pre.batch, n_new, dtype=torch.bool, device=prefix_valid.device)
        bias = torch.cat([prefix_bias, torch.where(new_valid, 0.0, float("-inf"))], dim=1)
        valid = torch.cat([prefix_valid, new_valid], dim=1)
        # A decode step (q == 1) keeps the explicit (B, 1, 1, K) mask: without a causal part it costs
        # SDPA nothing, while the extra-column trick would copy the layer's whole K/V cache every
        # step. SDPA's is_causal aligns top-left, so 1 < q < K needs the mask too; only q == K
        # (queries and keys of one chunk) takes the fast path.
        if allow_fast and pre.fast and q == bias.shape[1]:
            return None, self._bias(bias, valid)
        return self._mask(bias, valid, q, hidden.dtype), None

    # --- the reduction step -------------------------------------------------------------------

    def _reduce(self, i: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run the method on every sample at layer i; install the new layout; return new hidden."""
        pre, red = self.state.prefill, self.state.reduced
        if red.layout is None:
            dev = hidden.device
            cos, sin = kwargs["position_embeddings"]
            positions = pre.positions.to(dev)
            removable = None if pre.removable is None else pre.removable.to(dev)
            red.layout = initial_layout(
                pre.valid.to(dev), pre.candidates.to(dev), positions, cos, sin, removable=removable
            )
            red.original_rope = (red.layout.cos, red.layout.sin)
            red.first_position = first_positions(pre.valid.to(dev), positions)  # for renumber
        lay = red.layout
        red.timer.start(hidden.device)
        valid_rows = lay.slot_orig >= 0
        if not bool(torch.isfinite(hidden[valid_rows]).all()):
            raise ValueError(
                f"non-finite (NaN/inf) hidden states enter decoder layer {i}; pact cannot reduce them "
                "(check the model's dtype and inputs)"
            )
        plans: list[SamplePlan] = []
        step_records: list[ReductionRecord | None] = []
        reductions: list[Reduction | None] = []
        previous = red.records[-1] if red.records else None
        for b in range(hidden.shape[0]):
            slots = torch.nonzero(valid_rows[b], as_tuple=False).flatten()  # (n,)
            vis = lay.visual[b, slots]
            vis_pos = torch.nonzero(vis, as_tuple=False).flatten()  # indices into slots
            # the sample's removable non-candidate slots (image newlines), indices into slots
            removable = None
            if lay.removable is not None:
                removable = torch.nonzero(lay.removable[b, slots], as_tuple=False).flatten()
            reduction = None
            if vis_pos.numel():
                reduction = self._call_method(i, layer, b, hidden, slots, vis, vis_pos)
            plan = plan_sample(
                slots, vis_pos, lay.sizes[b, slots], reduction, layer=i, sample=b, removable=removable
            )
            plans.append(plan)
            if reduction is not None:
                orig_vis = lay.visual_index[b, slots[vis_pos]]
                prev_b = previous[b] if previous is not None else None
                step_records.append(
                    step_record(i, reduction, orig_vis, pre.visual_before[b], prev_b, plan.removed_slots)
                )
                if self.config.position_mode == "mean" and reduction.kept.numel():
                    self._mean_positions(
                        b, slots, vis_pos, vis_pos[reduction.kept], reduction.labels.to(slots.device)
                    )
            else:
                step_records.append(None)
            reductions.append(reduction)
        packing = pack_batch(plans, old_length=hidden.shape[1])
        new_hidden = pack_hidden(hidden, packing)
        new = gather_layout(red.layout, packing)
        if red.injection is not None:
            self._follow_injection(i, reductions, packing)
        if self.renumber:
            # Contiguous positions over each sample's reduced sequence, from the position the stock
            # model gave the sample's first token (0 unless left padding offsets it), as the stock
            # model numbers a prompt that is that short.
            new.positions = renumbered_positions(red.first_position.to(new_hidden.device), packing.slot_ok)
            new.cos, new.sin = self.adapter.rotary(new_hidden, new.positions)
        if not pre.fast and self.layer_rules is None:
            mask_dtype = lay.cos.dtype if not self.flash else torch.bool
            new.mask = self._mask(new.key_bias, packing.slot_ok, new_hidden.shape[1], mask_dtype)
        red.layout = new
        red.rule_tables, red.slot_blocks = {}, None
        red.layers_done.append(i)
        red.records.append(step_records)
        red.timer.stop()
        return new_hidden

    def _call_method(
        self,
        i: int,
        layer: nn.Module,
        b: int,
        hidden: torch.Tensor,
        slots: torch.Tensor,
        vis: torch.Tensor,
        vis_pos: torch.Tensor,
    ) -> Reduction:
        st = self.state
        lay = st.reduced.layout
        h_b = hidden[b, slots]
        cos_b, sin_b = lay.cos[b, slots], lay.sin[b, slots]
        if self.layer_rules is not None:  # layer i's own rotary table on the current layout
            cos_i, sin_i = self._rule_rope(self.layer_rules[i].rotary, hidden)
            cos_b, sin_b = cos_i[b, slots], sin_i[b, slots]
        orig_valid = torch.nonzero(st.prefill.valid[b], as_tuple=False).flatten().to(hidden.device)

        def qk_fn(j: int, h: torch.Tensor, rope: bool, want_q: bool, want_k: bool) -> tuple:
            if j == i:
                c, s = cos_b, sin_b
            elif self.layer_rules is not None:  # layer j's table of the original positions
                pos = st.prefill.positions[:, b : b + 1, orig_valid.to(st.prefill.positions.device)]
                c, s = self.adapter.layer_rotary(self.layer_rules[j].rotary, h[None], pos.to(h.device))
                c, s = c[0], s[0]
            else:
                c, s = st.reduced.original_rope[0][b, orig_valid], st.reduced.original_rope[1][b, orig_valid]
            return self.adapter.queries_keys(
                self.adapter.layers[j], h, c if rope else None, s if rope else None, want_q, want_k
            )

        def layer_input(j: int) -> torch.Tensor:
            if j not in st.reduced.layer_inputs:
                raise ValueError(
                    f"{type(self.method).__name__} reads the input of layer {j} but does not list it in "
                    "input_layers()"
                )
            return st.reduced.layer_inputs[j][b, orig_valid]

        rules = {}
        if self.layer_rules is not None:  # the layers' own masks for the scoring ops (Visibility)
            rules = {
                "attention_blocks": self._slot_blocks()[b, slots] if st.prefill.blocks is not None else None,
                "windows": [rule.window for rule in self.layer_rules],
            }
        signals = Signals(
            layer=i,
            sample=b,
            hidden=h_b,
            visual_mask=vis,
            sizes=lay.sizes[b, slots[vis_pos]],
            positions=lay.positions[:, b, slots],
            visual_index=lay.visual_index[b, slots[vis_pos]],
            config=self.config,
            qk_fn=qk_fn,
            cos_sin_fn=lambda: (cos_b, sin_b),
            layer_input_fn=layer_input,
            model=self.model,
            adapter=self.adapter,
            inputs=st.prefill.inputs,
            context=st.context,
            **rules,
        )
        red = self.method.reduce(signals)
        red.validate(int(vis_pos.numel()), int(hidden.shape[-1]))
        return red

    def _mean_positions(
        self, b: int, slots: torch.Tensor, vis_pos: torch.Tensor, kept_pos: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """position_mode="mean": a merged token takes the rounded mean position (per axis) of its members."""
        lay = self.state.reduced.layout
        members = labels >= 0
        pos = lay.positions[:, b, slots[vis_pos]].float()  # (A, N)
        A = pos.shape[0]
        R = kept_pos.numel()
        total = torch.zeros(A, R, device=pos.device).index_add_(1, labels[members], pos[:, members])
        count = torch.zeros(R, device=pos.device).index_add_(
            0, labels[members], torch.ones_like(pos[0, members])
        )
        mean = torch.round(total / count.clamp(min=1)).long()
        # Write into the current layout; the gather that follows carries it to the new layout.
        lay.positions = lay.positions.clone()
        lay.positions[:, b, slots[kept_pos]] = mean
        lay.cos, lay.sin = lay.cos.clone(), lay.sin.clone()
        cos, sin = self.adapter.rotary(lay.cos[b : b + 1, :R].float(), mean[:, None, :])
        lay.cos[b, slots[kept_pos]] = cos[0].to(lay.cos.dtype)
        lay.sin[b, slots[kept_pos]] = sin[0].to(lay.sin.dtype)

    # --- visual features added after decoder layers (Qwen3-VL's DeepStack) -----------------------

    def _take_injection(self, kwargs: dict) -> None:
        """Text-model pre-hook of a reduced prefill: take the visual features the model would add
        after some decoder layers out of the call (``ModelAdapter.take_visual_injection``); the
        layers' post-hooks add them to the current layout instead."""
        pre = self.state.prefill
        taken = self.adapter.take_visual_injection(kwargs)
        if taken is None:
            return
        mask = taken.mask.to(pre.candidates.device)
        if bool((pre.candidates & ~mask).any()):
            raise ValueError(
                f"{self.adapter.family}: some visual candidates receive no injected feature; pact cannot "
                "combine the features of merged tokens"
            )
        flat = mask.flatten()
        rows = torch.where(flat, flat.long().cumsum(0) - 1, -1).view(mask.shape)
        self.state.reduced.injection = FollowedInjection(features=dict(taken.features), rows=rows)

    def _follow_injection(self, i: int, reductions: list[Reduction | None], packing: Any) -> None:
        """Reduction step at layer i: the features still to be added (layers >= i) follow the new
        layout. A kept token keeps its row; a merged token's row (its center's) gets the size-weighted
        mean of its members' features, the combination every merging method gives its hidden state
        (``Reduction.hidden``; None: the center keeps its own); new tokens get none."""
        inj, lay = self.state.reduced.injection, self.state.reduced.layout
        pending = list(inj.features)  # the layers >= i (each is dropped once added)
        rows = inj.rows.to(lay.slot_orig.device)
        for b, reduction in enumerate(reductions):
            if reduction is None or reduction.hidden is None or not pending or not reduction.kept.numel():
                continue
            slots = torch.nonzero(lay.slot_orig[b] >= 0, as_tuple=False).flatten()
            vis_slots = slots[lay.visual[b, slots]]  # (N,) the current visual tokens, in order
            member_rows = rows[b, vis_slots]  # (N,) all >= 0: candidates receive features
            labels = reduction.labels.to(rows.device)
            kept_rows = member_rows[reduction.kept.to(rows.device)]
            weights = lay.sizes[b, vis_slots]
            for k in pending:
                features = inj.features[k]
                merged = cluster_means(
                    features[member_rows.to(features.device)], labels.to(features.device),
                    int(reduction.kept.numel()), weights.to(features.device),
                )  # fmt: skip
                if k not in inj.owned:
                    features = inj.features[k] = features.clone()
                    inj.owned.add(k)
                features[kept_rows.to(features.device)] = merged.to(features.dtype)
        # gather to the new slots; padding and new tokens receive nothing
        gathered = rows.gather(1, packing.index)
        inj.rows = torch.where(packing.slot_ok & ~packing.is_new, gathered, -1)

    def _inject_hook(self, i: int) -> Any:
        """Post-hook of decoder layer i: add the features the model adds after layer i (if any) to the
        current layout's slots (``ModelAdapter.inject``, the model's own addition)."""

        def hook(layer: nn.Module, args: tuple, output: Any) -> Any:
            inj = self.state.reduced.injection
            if inj is None or not self.state.call.is_prefill or i not in inj.features:
                return output
            mask = inj.rows >= 0
            features = inj.features.pop(i)  # added once: later reduction steps need not follow it
            if not inj.features:
                self.state.reduced.injection = None
            return self.adapter.inject(output, mask, features[inj.rows[mask].to(features.device)])

        return hook


def _is_dynamic_cache(cache: Any) -> bool:
    from transformers.cache_utils import DynamicCache

    return isinstance(cache, DynamicCache)


def check_attention_backend(adapter: ModelAdapter, config: Any, method: Method | None) -> None:
    """Raise ValueError at apply time when the model's attention backend cannot run ``config``."""
    if method is None or not getattr(config, "reduction", True):
        return
    impl = adapter.attn_implementation
    if impl == attention_backend.PACT_SDPA:  # pact is applied already (apply replaces it)
        impl = "sdpa"
    if impl.startswith("flash_attention"):
        if adapter.layer_attention() is not None:
            raise ValueError(
                f"the model uses attn_implementation={impl!r}, which cannot take the per-layer masks "
                f"{adapter.family} needs (image blocks, sliding windows) on a reduced sequence; load the "
                "model with attn_implementation='sdpa' (or 'eager')"
            )
        if getattr(config, "proportional_attention", True) and method.needs_merge:
            raise ValueError(
                f"the model uses attn_implementation={impl!r}, which cannot add the proportional-attention "
                "bias log(size) to attention logits; set proportional_attention=false in the pact config "
                "(reference name: no_proportional_attention=true) or load the model with "
                "attn_implementation='sdpa' (or 'eager')"
            )
        return
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"pact supports attn_implementation 'sdpa', 'eager' and flash_attention_* (without proportional "
            f"attention); the model uses {impl!r}: call model.set_attn_implementation('sdpa')"
        )


__all__ = ["CallState", "Engine", "Layout", "ReductionRecord", "ReductionStats", "check_attention_backend"]
