"""lmms-eval registration payloads, one ``ModelManifest`` per model family.

lmms-eval reads the ``lmms_eval.models`` entry-point group when ``lmms_eval.models`` is imported and
resolves ``--model pact_<family>`` through these manifests. This module is deliberately tiny (no
torch, no transformers) because every lmms-eval start imports it; the classes live in
``pact.eval.models`` and are imported only when a pact model is actually requested.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest


def _manifest(family: str, class_name: str) -> ModelManifest:
    return ModelManifest(model_id=f"pact_{family}", simple_class_path=f"pact.eval.models.{class_name}")


QWEN2_VL_MANIFEST = _manifest("qwen2_vl", "PactQwen2VL")
QWEN2_5_VL_MANIFEST = _manifest("qwen2_5_vl", "PactQwen2_5_VL")
LLAVA_ONEVISION_MANIFEST = _manifest("llava_onevision", "PactLlavaOnevision")
LLAVA_NEXT_MANIFEST = _manifest("llava_next", "PactLlavaNext")
LLAVA_MANIFEST = _manifest("llava", "PactLlava")
INTERNVL_MANIFEST = _manifest("internvl", "PactInternVL")

MANIFESTS: tuple[ModelManifest, ...] = (
    QWEN2_VL_MANIFEST,
    QWEN2_5_VL_MANIFEST,
    LLAVA_ONEVISION_MANIFEST,
    LLAVA_NEXT_MANIFEST,
    LLAVA_MANIFEST,
    INTERNVL_MANIFEST,
)
"""All six, in the order of ``pact.testing.FAMILIES``."""

ENTRY_POINTS: dict[str, str] = {
    m.model_id: f"pact.eval.manifest:{name}"
    for name, m in (
        ("QWEN2_VL_MANIFEST", QWEN2_VL_MANIFEST),
        ("QWEN2_5_VL_MANIFEST", QWEN2_5_VL_MANIFEST),
        ("LLAVA_ONEVISION_MANIFEST", LLAVA_ONEVISION_MANIFEST),
        ("LLAVA_NEXT_MANIFEST", LLAVA_NEXT_MANIFEST),
        ("LLAVA_MANIFEST", LLAVA_MANIFEST),
        ("INTERNVL_MANIFEST", INTERNVL_MANIFEST),
    )
}
"""The ``[project.entry-points."lmms_eval.models"]`` table of pyproject.toml (checked by a test)."""
