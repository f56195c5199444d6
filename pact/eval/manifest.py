"""lmms-eval registration payloads, one ``ModelManifest`` per model family of ``pact.models.ADAPTERS``.

lmms-eval reads the ``lmms_eval.models`` entry-point group when ``lmms_eval.models`` is imported and
resolves ``--model pact_<family>`` through these manifests. This module stays small (no transformers,
no lmms-eval model code): the classes live in ``pact.eval.models`` and are imported only when a pact
model is actually requested. It imports ``pact.models`` (and so torch, which the lmms-eval command
line imports anyway) to read the family table.

pyproject.toml declares one entry point, ``pact = "pact.eval.manifest:MANIFESTS"``, whose payload is
the tuple of every family's manifest (lmms-eval accepts an iterable of manifests), so a new adapter
needs no pyproject edit and no reinstall of the metadata. Each manifest is also a module attribute
named ``<FAMILY>_MANIFEST`` (``QWEN2_VL_MANIFEST`` ...): the per-family entry points of earlier
versions, which an environment installed before this change may still declare, keep resolving.
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

ENTRY_POINTS: dict[str, str] = {"pact": "pact.eval.manifest:MANIFESTS"}
"""The ``[project.entry-points."lmms_eval.models"]`` table of pyproject.toml (checked by a test)."""
