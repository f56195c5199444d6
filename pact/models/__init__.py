"""One adapter per supported model family; ``get_adapter(model)`` picks it from the class or
``config.model_type``."""

from __future__ import annotations

from torch import nn

from pact.models.base import ModelAdapter, unsupported_model_error
from pact.models.gemma3 import Gemma3Adapter
from pact.models.glm4v import Glm4vAdapter
from pact.models.internvl import InternVLAdapter
from pact.models.llava import LlavaAdapter
from pact.models.llava_next import LlavaNextAdapter
from pact.models.llava_onevision import LlavaOnevisionAdapter
from pact.models.qwen2_5_vl import Qwen2_5_VLAdapter
from pact.models.qwen2_vl import Qwen2VLAdapter
from pact.models.qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter
from pact.models.qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter
from pact.models.smolvlm import SmolVLMAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.family: cls
    for cls in (
        Qwen2VLAdapter,
        Qwen2_5_VLAdapter,
        LlavaOnevisionAdapter,
        LlavaNextAdapter,
        LlavaAdapter,
        InternVLAdapter,
        Qwen3VLAdapter,
        Qwen3VLMoeAdapter,
        Qwen3_5Adapter,
        Qwen3_5MoeAdapter,
        SmolVLMAdapter,
        Glm4vAdapter,
        Gemma3Adapter,
    )
}
"""Family name -> adapter class."""


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model`` (a ``*ForConditionalGeneration`` or ``*Model`` of a supported family).

    Raises:
        ValueError: the class is not supported (the message lists the supported classes).
    """
    name = type(model).__name__
    for cls in ADAPTERS.values():
        if name in cls.class_names:
            return cls(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS.values():
        if model_type in cls.model_types and hasattr(getattr(model, "model", model), "language_model"):
            return cls(model)
    raise unsupported_model_error(model, ADAPTERS)


__all__ = ["ADAPTERS", "ModelAdapter", "get_adapter"]
