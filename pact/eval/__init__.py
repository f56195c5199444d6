"""Evaluation: lmms-eval models (``models``), run metrics (``metrics``), ``pact report`` (``report``)
and ``pact plot`` (``plot``).

Importing this package is cheap; ``pact.eval.models`` imports lmms-eval and is loaded by lmms-eval
itself through the ``lmms_eval.models`` entry points (``pact.eval.manifest``).
"""
