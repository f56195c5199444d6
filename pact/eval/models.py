"""lmms-eval models: a stock Hugging Face VLM and its stock processor, with pact applied.

One generic wrapper (``PactHFModel``) and a thin subclass per family, registered as
``pact_qwen2_vl``, ``pact_qwen2_5_vl``, ``pact_llava_onevision``, ``pact_llava_next``, ``pact_llava``
and ``pact_internvl`` (one per adapter; manifests in ``pact.eval.manifest``, one entry point in
pyproject.toml):

    python -m lmms_eval --model pact_qwen2_vl \\
        --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,pact_config=pact,keep_ratio=0.8,cutoff=0.1 \\
        --tasks textvqa_val --batch_size 4 --output_path runs/qwen --log_samples

``--model_args`` holds everything: ``pretrained``, ``pact_config`` (a JSON path or a config name such
as ``pact`` / ``no_reduction``; default: the PACT defaults), loading options (``LOADING_OPTIONS``) and,
for any other key, a configuration override by our name or the reference's (``keep_ratio=0.8``,
``pruning_tokeep_percentage_value=0.8``, ``layer=2`` ...). Nothing is read from the environment.

Requests are batched with left padding. ``generate_until`` decodes greedily unless the task asks
for sampling, and cuts the text at the task's ``until`` strings. ``loglikelihood`` scores
context + continuation in one forward: the engine keeps the output length equal to the input length,
so the continuation's log-probabilities come straight from the full-length logits.

After every model call the wrapper's ``RunMetrics`` (``pact.eval.recording``) reads ``pact.stats``
(visual tokens before/after per sample) and its own timers; at the end of the run (lmms-eval calls
``clean()``) the records of all processes are gathered, summarised (``pact.eval.metrics``), printed
as a table, added to lmms-eval's ``results["throughput"]`` and written as JSON:

    <output_path>/<model name as lmms-eval sanitises it>/<date id>_pact_metrics.json

next to lmms-eval's ``<date id>_results.json`` of the same run (same date id), and, if the config
sets ``log_output_path``, also as ``<log_output_path>/<date id>_<model>_pact_metrics.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image

from pact.eval import metrics as M
from pact.eval.recording import RunMetrics
from pact.models import ADAPTERS

FAMILIES: dict[str, tuple[str, tuple[str, ...], str, bool]] = {
    family: (adapter.class_names[0], adapter.model_types, adapter.default_checkpoint, adapter.has_video)
    for family, adapter in ADAPTERS.items()
}
"""family -> (transformers class name, config.model_type values, default checkpoint, accepts video),
read from the adapters of ``pact.models.ADAPTERS``."""

LOADING_OPTIONS: dict[str, str] = {
    "pretrained": "checkpoint directory or hub id (default: the family's 7B/8B checkpoint)",
    "pact_config": "JSON path or config name (pact, no_reduction, fastv ...); default: PACT defaults",
    "dtype": "auto | float16 | bfloat16 | float32 (default auto: the checkpoint's dtype)",
    "attn_implementation": "sdpa (default) | eager | flash_attention_2 (no proportional attention)",
    "device": "cuda | cuda:N | cpu (default: cuda if available; per process under accelerate)",
    "device_map": "passed to from_pretrained (e.g. auto to split a model over GPUs)",
    "batch_size": "requests per model call (lmms-eval's --batch_size)",
    "max_pixels": "Qwen families: image max pixels for the processor",
    "min_pixels": "Qwen families: image min pixels for the processor",
    "do_pan_and_scan": "Gemma 3: pan-and-scan crops of non-square images, as the processor option "
    "(default false, as the released processor configs)",
    "frames": "video frames sampled uniformly per video (default 32)",
    "max_new_tokens": "default when a task gives none (default 128)",
    "system_prompt": "optional system message",
    "chat_template": "Jinja template (or a path to one) replacing the processor's",
    "use_cache": "KV cache in generate (default true)",
    "trust_remote_code": "passed to from_pretrained (default false)",
    "label": "method name used in reports and plots (default: derived from the config)",
    "timing": "per-call timing with device syncs (default true)",
}
"""Every ``--model_args`` key that is not a configuration key."""

_IGNORED_ARGS = ("max_batch_size",)  # passed by lmms-eval, meaningless here
_VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")


# ---------------------------------------------------------------------------------------------------
# Small pure helpers


def parse_value(value: Any) -> Any:
    """A ``--model_args`` value as the config expects it. lmms-eval already turns true/false and
    numbers into Python values; ``null`` and ``None`` mean None (e.g. ``target_ratio=None``)."""
    if isinstance(value, str) and value in ("null", "None"):
        return None
    return value


def _positive_int(key: str, value: Any, lo: int = 1) -> int:
    """An integer >= lo from an int or a string of digits; ValueError naming the key otherwise."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        hint = (
            " (pact models do not search a batch size; give a number)"
            if str(value).startswith("auto")
            else ""
        )
        raise ValueError(f"{key}={value!r}: expected an integer >= {lo}{hint}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected true or false")
    return value


DTYPES = ("auto", "float16", "bfloat16", "float32")


def check_loading_args(
    *,
    dtype: Any,
    batch_size: Any,
    max_pixels: Any,
    min_pixels: Any,
    frames: Any,
    max_new_tokens: Any,
    use_cache: Any,
    trust_remote_code: Any,
    timing: Any,
    do_pan_and_scan: Any = False,
) -> dict[str, Any]:
    """Validate the loading options of ``--model_args`` before anything is loaded.

    Returns them normalised (integers as int). Raises ValueError naming the key, the value and
    what is allowed: batch_size/frames/max_new_tokens integers >= 1, max_pixels/min_pixels None
    or integers >= 1 with min_pixels <= max_pixels, dtype one of ``DTYPES``, flags true/false.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    out: dict[str, Any] = {
        "dtype": dtype,
        "batch_size": _positive_int("batch_size", batch_size),
        "frames": _positive_int("frames", frames),
        "max_new_tokens": _positive_int("max_new_tokens", max_new_tokens),
        "use_cache": _flag("use_cache", use_cache),
        "trust_remote_code": _flag("trust_remote_code", trust_remote_code),
        "timing": _flag("timing", timing),
        "do_pan_and_scan": _flag("do_pan_and_scan", do_pan_and_scan),
    }
    for key, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
        out[key] = None if value is None else _positive_int(key, value)
    if (
        out["max_pixels"] is not None
        and out["min_pixels"] is not None
        and out["min_pixels"] > out["max_pixels"]
    ):
        raise ValueError(f"min_pixels={out['min_pixels']} is larger than max_pixels={out['max_pixels']}")
    return out


def merge_model_args(model_args: dict[str, Any], additional: dict[str, Any] | None) -> dict[str, Any]:
    """lmms-eval's own arguments (batch_size, device ...; None = not given) under ``--model_args``."""
    extra = {k: v for k, v in (additional or {}).items() if v is not None}
    return {**extra, **model_args}


def split_visuals(visuals: Any) -> tuple[list[Image.Image], list[Any]]:
    """Split what a task's ``doc_to_visual`` returned into images and videos.

    Images: PIL images, image file paths, (H, W, 3) arrays. Videos: video file paths (decoded
    later), lists of frames, (T, H, W, 3) arrays.
    """
    if visuals is None:
        return [], []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images: list[Image.Image] = []
    videos: list[Any] = []
    for v in visuals:
        if v is None:
            continue
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, (str, os.PathLike)):
            path = os.fspath(v)
            if path.lower().endswith(_VIDEO_EXTENSIONS):
                videos.append(path)
            else:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
        elif isinstance(v, np.ndarray) and v.ndim == 3:
            images.append(Image.fromarray(v).convert("RGB"))
        elif isinstance(v, np.ndarray) and v.ndim == 4:
            videos.append(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(f, Image.Image) for f in v):
            videos.append([f.convert("RGB") for f in v])
        elif isinstance(v, dict) and "bytes" in v:
            import io

            images.append(Image.open(io.BytesIO(v["bytes"])).convert("RGB"))
        else:
            raise TypeError(f"unsupported visual of type {type(v).__name__} from the task's doc_to_visual")
    return images, videos


def load_video(path: str, frames: int) -> np.ndarray:
    """``frames`` frames sampled uniformly from a video file: uint8 (T, H, W, 3).

    Decoded with PyAV (lmms-eval's own video dependency), one frame at a time: only the sampled
    frames are converted and kept, so a long video never sits in memory whole.
    """
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        n = int(stream.frames or 0)
        if n <= 0:  # the container does not say: count the packets (no decoding)
            n = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        if n == 0:
            raise ValueError(f"video {path} has no frames")
        wanted = set(np.unique(np.linspace(0, n - 1, min(frames, n)).round().astype(int)).tolist())
        kept = [
            frame.to_ndarray(format="rgb24")
            for i, frame in enumerate(container.decode(stream))
            if i in wanted
        ]
    if not kept:
        raise ValueError(f"video {path}: no frame could be decoded")
    return np.stack(kept)


def as_frames(video: Any, frames: int) -> np.ndarray:
    """A video (file path, list of PIL frames or (T, H, W, 3) array) as a uint8 (T, H, W, 3) array of
    at most ``frames`` frames sampled uniformly (one type for every video of a batch: the stock
    video processors reject a batch mixing lists and arrays)."""
    if isinstance(video, str):
        return load_video(video, frames)
    array = (
        np.stack([np.asarray(f.convert("RGB")) for f in video]) if isinstance(video, (list, tuple)) else video
    )
    array = np.asarray(array)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"a video must have shape (T, H, W, 3), got {array.shape}")
    if array.shape[0] > frames:
        array = array[np.unique(np.linspace(0, array.shape[0] - 1, frames).round().astype(int))]
    return array.astype(np.uint8, copy=False)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any non-empty stop string."""
    end = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                end = min(end, i)
    return text[:end]


def batches(indices: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive chunks of at most ``size`` indices."""
    size = max(1, int(size))
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def group_by_kwargs(gen_kwargs: Sequence[dict], lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped by identical generation kwargs, each group longest context first (so the
    first batch shows the worst-case memory and a batch holds similar lengths)."""
    groups: dict[str, list[int]] = {}
    for i, kw in enumerate(gen_kwargs):
        groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
    return [sorted(idx, key=lambda i: (-lengths[i], i)) for idx in groups.values()]


def continuation_logprob(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, bool]:
    """Log-probability of a continuation and whether greedy decoding would produce it.

    Args:
        logits: (n, V) logits at the n positions that PREDICT the continuation tokens (the last
            context position through the second-to-last continuation position).
        target: (n,) continuation token ids.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    total = logp.gather(-1, target[:, None]).sum()
    greedy = bool((logits.argmax(-1) == target).all())
    return float(total), greedy


def _first_stop(ids: torch.Tensor, stop_ids: set[int]) -> int:
    """Number of generated tokens up to and including the first stop token (all if none)."""
    for i, t in enumerate(ids.tolist()):
        if t in stop_ids:
            return i + 1
    return int(ids.numel())


# ---------------------------------------------------------------------------------------------------
# The model


class PactHFModel(lmms):
    """A stock Hugging Face VLM with pact applied, as an lmms-eval "simple" model."""

    is_simple = True
    family: ClassVar[str] = ""

    def __init__(
        self,
        pretrained: str | None = None,
        pact_config: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = "sdpa",
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        frames: int = 32,
        max_new_tokens: int = 128,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        use_cache: bool = True,
        trust_remote_code: bool = False,
        label: str | None = None,
        timing: bool = True,
        do_pan_and_scan: bool = False,
        **overrides: Any,
    ) -> None:
        super().__init__()
        import pact.api
        from pact.config import load_config

        if self.family not in FAMILIES:
            raise TypeError("use one of the family classes (PactQwen2VL, PactLlavaOnevision ...)")
        class_name, model_types, default_ckpt, self.accepts_video = FAMILIES[self.family]
        for key in _IGNORED_ARGS:
            overrides.pop(key, None)
        overrides = {k: parse_value(v) for k, v in overrides.items()}
        try:
            checked = check_loading_args(
                dtype=dtype,
                batch_size=batch_size,
                max_pixels=parse_value(max_pixels),
                min_pixels=parse_value(min_pixels),
                frames=frames,
                max_new_tokens=max_new_tokens,
                use_cache=use_cache,
                trust_remote_code=trust_remote_code,
                timing=timing,
                do_pan_and_scan=do_pan_and_scan,
            )
            if checked["do_pan_and_scan"] and self.family != "gemma3":
                raise ValueError(
                    "do_pan_and_scan=true: pan-and-scan is an option of Gemma 3's processor only"
                )
        except ValueError as e:
            raise ValueError(f"pact_{self.family}: bad --model_args {e}") from e
        self.do_pan_and_scan = checked["do_pan_and_scan"]
        max_pixels, min_pixels = checked["max_pixels"], checked["min_pixels"]
        try:
            self.config = load_config(parse_value(pact_config), **overrides)
        except ValueError as e:
            raise ValueError(
                f"pact_{self.family}: bad --model_args ({e}). Keys that are not configuration keys must be "
                f"loading options: {', '.join(sorted(LOADING_OPTIONS))}"
            ) from e
        self.pretrained = str(pretrained or default_ckpt)
        self.model_args = {
            "pretrained": self.pretrained,
            "pact_config": pact_config,
            "dtype": dtype,
            "attn_implementation": attn_implementation,
            "device_map": device_map,
            "max_pixels": max_pixels,
            "min_pixels": min_pixels,
            "frames": frames,
            "max_new_tokens": max_new_tokens,
            "system_prompt": system_prompt,
            "chat_template": chat_template,
            "do_pan_and_scan": self.do_pan_and_scan,
            **overrides,
        }
        self.label = label or M.method_label(self.config.to_dict())
        self.frames = checked["frames"]
        self.default_max_new_tokens = checked["max_new_tokens"]
        self.system_prompt = system_prompt
        self.use_cache = use_cache
        self.batch_size_per_gpu = checked["batch_size"]

        self._setup_devices(device, device_map)
        self._model = self._load_model(class_name, model_types, dtype, attn_implementation, trust_remote_code)
        self.processor = self._load_processor(max_pixels, min_pixels, chat_template, trust_remote_code)
        self._tokenizer = getattr(self.processor, "tokenizer", self.processor)
        pact.api.apply(self._model, self.config)
        from pact.models import get_adapter

        self._adapter = get_adapter(self._model)
        self.metrics = RunMetrics(self._model, self._adapter, self.config, self.device, timing=timing)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PactHFModel:
        """lmms-eval's constructor path. Unlike the base class, a key given both in ``--model_args``
        and by lmms-eval itself (``--device``, ``--batch_size``) is not an error: --model_args wins."""
        from lmms_eval.utils import simple_parse_args_string

        return cls(**merge_model_args(simple_parse_args_string(arg_string), additional_config))

    # --- loading --------------------------------------------------------------------------------

    def _setup_devices(self, device: str | None, device_map: str | None) -> None:
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            # Data parallel: every process holds a whole model on its own device; requests are
            # already split by lmms-eval, so no DDP wrapper is needed for inference.
            self.accelerator = accelerator
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            self._device_map = str(accelerator.device) if device_map is None else device_map
        else:
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self._device = torch.device(device)
            self._device_map = device_map
            self._rank, self._world_size = 0, 1

    def _load_model(
        self,
        class_name: str,
        model_types: tuple[str, ...],
        dtype: str,
        attn_implementation: str | None,
        trust_remote_code: bool,
    ) -> torch.nn.Module:
        import transformers

        config = transformers.AutoConfig.from_pretrained(self.pretrained, trust_remote_code=trust_remote_code)
        if config.model_type not in model_types:
            owner = next((f for f, v in FAMILIES.items() if config.model_type in v[1]), None)
            hint = f"; use --model pact_{owner}" if owner else ""
            raise ValueError(
                f"pact_{self.family} expects a {class_name} checkpoint (model_type {model_types[0]!r}); "
                f"{self.pretrained} has model_type {config.model_type!r}{hint}"
            )
        torch_dtype = dtype if dtype == "auto" else getattr(torch, str(dtype), None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise ValueError(f"dtype={dtype!r}: use auto, float16, bfloat16 or float32")
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if self._device_map is not None:
            kwargs["device_map"] = self._device_map
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        model = getattr(transformers, class_name).from_pretrained(self.pretrained, **kwargs)
        if self._device_map is None:
            model = model.to(self._device)
        return model.eval()

    def _load_processor(
        self,
        max_pixels: int | None,
        min_pixels: int | None,
        chat_template: str | None,
        trust_remote_code: bool,
    ) -> Any:
        from transformers import AutoProcessor

        kwargs: dict[str, Any] = {}
        if max_pixels is not None or min_pixels is not None:
            if not self.family.startswith("qwen"):
                raise ValueError("max_pixels / min_pixels are options of the Qwen families only")
            if max_pixels is not None:
                kwargs["max_pixels"] = int(max_pixels)
            if min_pixels is not None:
                kwargs["min_pixels"] = int(min_pixels)
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        processor = AutoProcessor.from_pretrained(self.pretrained, **kwargs)
        if chat_template:
            text = Path(chat_template).read_text() if os.path.isfile(chat_template) else chat_template
            processor.chat_template = text
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
        return processor

    # --- lmms-eval properties ---------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the model's first device (differs from ``device`` with device_map=auto)."""
        try:
            return next(self._model.parameters()).device
        except StopIteration:  # pragma: no cover
            return self._device

    @property
    def eot_token_id(self) -> int | None:
        return self._tokenizer.eos_token_id

    # --- prompt building --------------------------------------------------------------------------

    def _prompt(self, context: str, n_images: int, n_videos: int) -> str:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
        content += [{"type": "video"} for _ in range(n_videos)]
        # Tasks written for LLaVA put "<image>" in the text; the images are placed before the text.
        content.append(
            {"type": "text", "text": context.replace("<image>", "").strip() if n_images else context}
        )
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _visuals(self, request: Instance) -> tuple[list[Image.Image], list[Any]]:
        args = request.args
        doc_to_visual, doc_id, task, split = args[2], args[3], args[4], args[5]
        doc = self.task_dict[task][split][doc_id]
        return self._split(doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual, task)

    def _split(self, visuals: Any, task: str) -> tuple[list[Image.Image], list[Any]]:
        """A task's visuals -> (images, videos as frame lists)."""
        images, videos = split_visuals(visuals)
        if videos and not self.accepts_video:
            raise ValueError(f"pact_{self.family}: this model family does not accept videos (task {task})")
        return images, [as_frames(v, self.frames) for v in videos]

    def _encode(self, prompts: list[str], images: list[list[Image.Image]], videos: list[list[Any]]) -> Any:
        kwargs: dict[str, Any] = {}
        if any(images):
            kwargs["images"] = images  # nested per sample (LLaVA-OneVision counts images per sample)
            if self.do_pan_and_scan:
                kwargs["do_pan_and_scan"] = True
        flat_videos = [v for vs in videos for v in vs]
        if flat_videos:
            kwargs["videos"] = flat_videos
        return self.processor(text=prompts, padding=True, padding_side="left", return_tensors="pt", **kwargs)

    def _encode_requests(self, requests: Sequence[Instance], visuals: Sequence[tuple[list, list]]) -> Any:
        prompts = [
            self._prompt(r.args[0], len(im), len(vi)) for r, (im, vi) in zip(requests, visuals, strict=True)
        ]
        return self._encode(prompts, [v[0] for v in visuals], [v[1] for v in visuals])

    # --- measuring ------------------------------------------------------------------------------------

    # --- generate_until ---------------------------------------------------------------------------------

    def _generation_kwargs(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list, got {type(until).__name__}")
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kw.pop("do_sample", False)) or temperature > 0
        out: dict[str, Any] = {
            "max_new_tokens": int(kw.pop("max_new_tokens", self.default_max_new_tokens)),
            "do_sample": do_sample,
            "num_beams": int(kw.pop("num_beams", 1) or 1),
            "use_cache": self.use_cache,
        }
        top_p = kw.pop("top_p", None)
        if do_sample:
            out["temperature"] = temperature if temperature > 0 else 1.0
            if top_p is not None:
                out["top_p"] = float(top_p)
        gen_cfg = getattr(self._model, "generation_config", None)
        if gen_cfg is not None and gen_cfg.pad_token_id is None:
            out["pad_token_id"] = self._tokenizer.pad_token_id
        # Options that only change the sampling distribution are pointless in greedy decoding;
        # anything else the task passes goes to generate.
        for key in ("top_k", "repetition_penalty", "length_penalty", "min_new_tokens"):
            if key in kw:
                out[key] = kw.pop(key)
        kw.pop("image_aspect_ratio", None)
        return out, [str(u) for u in until]

    def _stop_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_cfg = getattr(self._model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        for value in (eos, self._tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        gen_kwargs = [r.args[1] if isinstance(r.args[1], dict) else {} for r in requests]
        lengths = [len(r.args[0]) for r in requests]
        for group in group_by_kwargs(gen_kwargs, lengths):
            kwargs, until = self._generation_kwargs(gen_kwargs[group[0]])
            for chunk in batches(group, self.batch_size):
                reqs = [requests[i] for i in chunk]
                t0 = time.perf_counter()
                visuals = [self._visuals(r) for r in reqs]
                answers = self._generate(
                    "generate_until", reqs, [r.args[0] for r in reqs], visuals, kwargs, until, t0
                )
                for i, req, answer in zip(chunk, reqs, answers, strict=True):
                    results[i] = answer
                    self.cache_hook.add_partial("generate_until", (req.args[0], gen_kwargs[i]), answer)
        return [r if r is not None else "" for r in results]

    def _generate(
        self,
        kind: str,
        reqs: Sequence[Instance],
        contexts: Sequence[str],
        visuals: Sequence[tuple[list, list]],
        kwargs: dict[str, Any],
        until: list[str],
        t0: float,
    ) -> list[str]:
        """One batched ``generate`` call: per request its context and (images, videos); returns the
        answers cut at the stop strings. ``t0``: when preprocessing of this batch started."""
        prompts = [self._prompt(c, len(im), len(vi)) for c, (im, vi) in zip(contexts, visuals, strict=True)]
        inputs = self._encode(prompts, [v[0] for v in visuals], [v[1] for v in visuals]).to(self.input_device)
        preprocess_s = time.perf_counter() - t0
        self.metrics.start_call()
        out = self._model.generate(**inputs, **kwargs)
        timing = self.metrics.stop_call()
        new = out[:, inputs["input_ids"].shape[1] :]
        stop_ids = self._stop_token_ids()
        lengths_new = [_first_stop(row, stop_ids) for row in new]
        self.metrics.record(
            kind,
            reqs,
            inputs,
            preprocess_s,
            timing,
            sum(lengths_new),
            sum(max(n - 1, 0) for n in lengths_new),
        )
        texts = self._tokenizer.batch_decode(
            [row[:n] for row, n in zip(new, lengths_new, strict=True)], skip_special_tokens=True
        )
        return [cut_at_stop(text, until).strip() for text in texts]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[tuple[str, ...]]:
        """Multi-round generation, lmms-eval's protocol: round 0 answers the request's context; from
        round 1 on, the task's ``doc_to_text(doc, previous_output=, round_idx=, previous_round_info=)``
        returns ``(visuals, context, terminal, round_outputs, round_info)`` and the loop ends at
        ``terminal``. Each request yields the tuple of its rounds' answers. One request at a time:
        rounds depend on earlier answers, and every round is a fresh prefill (reduced anew)."""
        results: list[tuple[str, ...]] = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            kwargs, until = self._generation_kwargs(gen_kwargs if isinstance(gen_kwargs, dict) else {})
            doc = self.task_dict[task][split][doc_id]
            t0 = time.perf_counter()
            visuals = self._split(doc_to_visual(doc), task)
            outputs: list[str] = []
            info: Any = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    raw, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                    t0 = time.perf_counter()
                    visuals = self._split(raw or [], task)
                outputs.append(
                    self._generate(
                        "generate_until_multi_round", [req], [context], [visuals], kwargs, until, t0
                    )[0]
                )
                round_idx += 1
            results.append(tuple(outputs))
            self.cache_hook.add_partial("generate_until_multi_round", (req.args[0], gen_kwargs), outputs)
        return results

    # --- loglikelihood -------------------------------------------------------------------------------

    def _continuation(self, request: Instance) -> str:
        cont = request.args[1]
        if callable(cont):
            args = request.args
            cont = cont(self.task_dict[args[4]][args[5]][args[3]])
        if isinstance(cont, (list, tuple)):
            cont = cont[0]
        return str(cont)

    def _append_continuations(self, enc: Any, conts: list[list[int]]) -> Any:
        """Append each sample's continuation ids after its (left-padded) context and re-pad on the
        left. Returns the new batch; image tensors are untouched."""
        ids, mask = enc["input_ids"], enc["attention_mask"]
        B = int(ids.shape[0])
        pad = self._tokenizer.pad_token_id
        per_key: dict[str, list[torch.Tensor]] = {}
        seq_keys = [
            k for k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") if k in enc
        ]
        for b in range(B):
            keep = mask[b].bool()
            cont = torch.tensor(conts[b], dtype=ids.dtype)
            for key in seq_keys:
                row = enc[key][b][keep]
                if key == "input_ids":
                    tail = cont
                elif key == "attention_mask":
                    tail = torch.ones(len(cont), dtype=row.dtype)
                else:
                    tail = torch.zeros(len(cont), dtype=row.dtype)
                per_key.setdefault(key, []).append(torch.cat([row, tail]))
        T = max(int(r.numel()) for r in per_key["input_ids"])
        out = dict(enc.items())
        for key, rows in per_key.items():
            fill = pad if key == "input_ids" else 0
            padded = torch.full((B, T), fill, dtype=rows[0].dtype)
            for b, r in enumerate(rows):
                if r.numel():
                    padded[b, T - r.numel() :] = r
            out[key] = padded
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """``(log-probability, is_greedy)`` per request, each wrapped for lmms-eval 0.7.3.

        lmms-eval 0.7.3 passes every response through ``unwrap_generation_output``, which turns a
        plain ``(float, bool)`` tuple into its string, and multiple-choice scoring then fails
        ("too many values to unpack"). A ``GenerationResult`` is passed through untouched, so the
        tuple travels inside one. ``loglikelihood_values`` returns the plain tuples.
        """
        values = self.loglikelihood_values(requests)
        try:
            from lmms_eval.api.instance import GenerationResult
        except ImportError:  # older lmms-eval: tuples pass through as they are
            return values
        return [GenerationResult(text=v) for v in values]  # type: ignore[arg-type]

    @torch.inference_mode()
    def loglikelihood_values(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probabilities, greedy would produce it)`` per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        conts = [self._continuation(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i].args[0]) + len(conts[i])), i))
        for chunk in batches(order, self.batch_size):
            reqs = [requests[i] for i in chunk]
            t0 = time.perf_counter()
            visuals = [self._visuals(r) for r in reqs]
            enc = self._encode_requests(reqs, visuals)
            cont_ids = [self._tokenizer(conts[i], add_special_tokens=False)["input_ids"] for i in chunk]
            inputs = self._append_continuations(enc, cont_ids)
            inputs = {
                k: (v.to(self.input_device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()
            }
            preprocess_s = time.perf_counter() - t0
            self.metrics.start_call()
            logits = self._model(**inputs, use_cache=False).logits
            timing = self.metrics.stop_call()
            self.metrics.record("loglikelihood", reqs, inputs, preprocess_s, timing, 0, 0)
            T = int(inputs["input_ids"].shape[1])
            for b, i in enumerate(chunk):
                n = len(cont_ids[b])
                if n == 0:
                    results[i] = (0.0, True)
                    continue
                target = inputs["input_ids"][b, T - n :]
                results[i] = continuation_logprob(logits[b, T - n - 1 : T - 1], target)
                self.cache_hook.add_partial("loglikelihood", (requests[i].args[0], conts[i]), results[i])
        return [r if r is not None else (float("-inf"), False) for r in results]

    # --- end of run ----------------------------------------------------------------------------------

    @property
    def recorder(self) -> M.RunRecorder:
        """This process's records so far (``pact.eval.recording.RunMetrics.recorder``)."""
        return self.metrics.recorder

    @property
    def pact_metrics(self) -> dict[str, Any] | None:
        """The metrics document of the run, once ``finalize_metrics`` ran (rank 0)."""
        return self.metrics.doc

    def finalize_metrics(self) -> dict[str, Any] | None:
        """Summarise the run, print the table, write the metrics JSON (rank 0). Idempotent."""
        run = {
            "model": f"pact_{self.family}",
            "family": self.family,
            "pretrained": self.pretrained,
            "label": self.label,
            "model_args": self.model_args,
            "batch_size": self.batch_size,
            "device": str(self.device),
        }
        return self.metrics.finalize(run, world_size=self._world_size, rank=self._rank)

    def clean(self) -> None:
        """lmms-eval calls this on every process once all requests ran: finish the metrics first."""
        try:
            self.finalize_metrics()
        except Exception as e:  # never lose lmms-eval's own results because of ours
            logger.exception(f"pact metrics failed: {e}")
        self.metrics.close()
        super().clean()


# ---------------------------------------------------------------------------------------------------
# One class per family (what lmms-eval's --model names resolve to)


def _family_class(adapter: Any) -> type[PactHFModel]:
    """The lmms-eval model class of one adapter (``--model pact_<family>``), e.g. ``PactQwen2VL``."""
    name = adapter.eval_class_name()
    doc = f"pact on {adapter.class_names[0]} (``--model {adapter.eval_model_name()}``)."
    attrs = {"family": adapter.family, "__doc__": doc, "__module__": __name__, "__qualname__": name}
    return type(name, (PactHFModel,), attrs)


FAMILY_CLASSES: dict[str, type[PactHFModel]] = {
    family: _family_class(adapter) for family, adapter in ADAPTERS.items()
}
"""family -> its lmms-eval model class, one per adapter of ``pact.models.ADAPTERS``. Each class is also
a module attribute under its own name (``pact.eval.models.PactQwen2VL`` ...), where the manifests
of ``pact.eval.manifest`` point."""
globals().update({cls.__name__: cls for cls in FAMILY_CLASSES.values()})
