"""lmms-eval registration payloads, one ``ModelManifest`` per model family of ``pact.models.ADAPTERS``.

lmms-eval reads the ``lmms_eval.models`` entry-point group when ``lmms_eval.models`` is imported and
resolves ``--model pact_<family>`` through these manifests. This module stays small (no transformers,
no lmms-eval model code): the classes live in ``pact.eval.models`` and are imported only when a pact
model is actually requested. It imports ``pact.models`` (and so torch, which the lmms-eval command
line imports anyway) to read the family table.

Each manifest is a module attribute named ``<FAMILY>_MANIFEST`` (``QWEN2_VL_MANIFEST`` ...), the
payload of the entry point ``pact_<family>``; pyproject.toml lists them statically (a test checks
that its table equals ``ENTRY_POINTS``).
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

from pact.models import ADAPTERS


def _manifest(adapter: type) -> ModelManifest:
    return ModelManifest(
        model_id=adapter.eval_model_name(),
        simple_class_path=f"pact.eval.models.{adapter.eval_class_name()}",
    )


def manifest_attribute(family: str) -> str:
    """Name of the module attribute holding ``family``'s manifest (``QWEN2_VL_MANIFEST``)."""
    return f"{family.upper()}_MANIFEST"


MANIFESTS: tuple[ModelManifest, ...] = tuple(_manifest(adapter) for adapter in ADAPTERS.values())
"""One per adapter, in the order of ``pact.models.ADAPTERS``."""

globals().update({manifest_attribute(f): m for f, m in zip(ADAPTERS, MANIFESTS, strict=True)})

ENTRY_POINTS: dict[str, str] = {
    m.model_id: f"pact.eval.manifest:{manifest_attribute(family)}"
    for family, m in zip(ADAPTERS, MANIFESTS, strict=True)
}
"""The ``[project.entry-points."lmms_eval.models"]`` table of pyproject.toml (checked by a test)."""
