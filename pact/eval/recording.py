"""What an lmms-eval model records about its run, and the metrics file it writes at the end.

``RunMetrics`` is owned by one ``pact.eval.models.PactHFModel``: around every model call it resets
the memory meter and times the call (``start_call`` / ``stop_call``), then reads ``pact.stats``
(visual tokens before/after per sample and per reduction step) and files one ``BatchRecord`` and
one ``SampleRecord`` per request (``record``). At the end of the run ``finalize`` gathers the
records of all processes on rank 0, summarises them (``pact.eval.metrics``), prints the table, adds
the key numbers to lmms-eval's ``results["throughput"]`` and writes the JSON

    <output_path>/<model name as lmms-eval sanitises it>/<date id>_pact_metrics.json

next to lmms-eval's ``<date id>_results.json`` of the same run (same date id), and, if the config
sets ``log_output_path``, also ``<log_output_path>/<date id>_<model>_pact_metrics.json``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pact.eval import metrics as M

THROUGHPUT_KEYS = (
    "reduction_ratio",
    "layer_mean_reduction_ratio",
    "visual_tokens_before_mean",
    "visual_tokens_after_mean",
    "seconds_reducing_mean",
    "prefill_seconds_mean",
    "decode_tokens_per_second",
    "end_to_end_seconds_mean",
    "peak_memory_gb_max",
)
"""Summary keys also copied to lmms-eval's ``results["throughput"]`` (as ``avg_pact_<key>``)."""


def find_evaluation_context() -> tuple[Any, str | None]:
    """lmms-eval's EvaluationTracker and run date of the ``simple_evaluate`` call running us.

    Both are arguments of lmms-eval's public ``simple_evaluate``; reading them from its frame is
    what lets the metrics file carry the same date id as lmms-eval's results file. (None, None)
    when we are not inside ``simple_evaluate``.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "simple_evaluate" and "evaluation_tracker" in frame.f_locals:
            return frame.f_locals.get("evaluation_tracker"), frame.f_locals.get("datetime_str")
        frame = frame.f_back
    return None, None


def _request_task(request: Any) -> str:
    return str(request.args[4]) if len(request.args) > 4 else str(getattr(request, "task_name", ""))


def _request_doc_id(request: Any) -> Any:
    return request.args[3] if len(request.args) > 3 else getattr(request, "doc_id", None)


class RunMetrics:
    """The run records of one lmms-eval model (see the module docstring).

    ``model``: the Hugging Face model pact is applied to; ``adapter``: its ``pact.models`` adapter
    (visual-token counts of runs without reduction); ``config``: the ``PactConfig``; ``timing``:
    time prefill, decode and the vision encoder separately (``CallTimer``), else whole calls only.
    """

    def __init__(
        self, model: torch.nn.Module, adapter: Any, config: Any, device: torch.device, *, timing: bool
    ):
        self._model = model
        self._adapter = adapter
        self._config = config
        self.n_layers = len(adapter.layers)
        self.reference_layer = M.reference_layer(config.to_dict(), self.n_layers)
        vision = None
        if timing:
            try:
                vision = adapter.vision_tower()
            except AttributeError:
                vision = None
        self.timer = M.CallTimer(model, vision, device) if timing else None
        self.memory = M.MemoryMeter(device)
        self.recorder = M.RunRecorder()
        self.doc: dict[str, Any] | None = None
        self._finalized = False
        self._call_start = 0.0

    # --- one model call ------------------------------------------------------------------------------

    def start_call(self) -> None:
        """Right before a model call: reset the peak-memory meter and start the timers."""
        self.memory.reset()
        if self.timer is not None:
            self.timer.start()
        self._call_start = time.perf_counter()

    def stop_call(self) -> dict[str, Any]:
        """Right after the call: ``call_s`` (wall time of the call) and, with ``timing``, the
        prefill / decode / vision seconds and forward count of ``CallTimer.stop``."""
        call_s = time.perf_counter() - self._call_start
        if self.timer is not None:
            return self.timer.stop()
        return {"call_s": call_s, "prefill_s": call_s, "decode_s": 0.0, "vision_s": None, "forwards": 0}

    def visual_counts(
        self, inputs: Mapping[str, Any]
    ) -> tuple[list[int], list[int], list[list[tuple[int, int]]]]:
        """Per sample of the last call: visual tokens before, after, and (layer, left) per reduction
        step, from ``pact.stats``."""
        import pact.api

        st = pact.api.stats(self._model)
        B = int(inputs["input_ids"].shape[0])
        if self._config.reduction and len(st.visual_before) == B:
            steps: list[list[tuple[int, int]]] = [[] for _ in range(B)]
            for step in st.records:
                for b, rec in enumerate(step):
                    if rec is not None:
                        steps[b].append((int(rec.layer), int(rec.kept.numel())))
            return list(st.visual_before), list(st.visual_after), steps
        # No reduction (the engine then counts nothing): count the visual patch tokens the way the
        # engine would, so reference runs report their visual tokens too.
        mask = self._adapter.candidate_mask(inputs["input_ids"], inputs)
        if inputs.get("attention_mask") is not None:
            mask = mask & inputs["attention_mask"].bool()
        counts = [int(c) for c in mask.sum(1).tolist()]
        return counts, counts, [[] for _ in range(B)]

    def record(
        self,
        kind: str,
        requests: Sequence[Any],
        inputs: Mapping[str, Any],
        preprocess_s: float,
        timing: Mapping[str, Any],
        generated: int,
        decode_tokens: int,
    ) -> None:
        """File the last call: one ``BatchRecord`` and one ``SampleRecord`` per request.

        ``kind``: "generate_until" / "loglikelihood" ...; ``timing``: what ``stop_call`` returned;
        ``generated``: tokens generated up to each answer's stop; ``decode_tokens``: of those, the
        ones that cost a decode step."""
        import pact.api

        before, after, steps = self.visual_counts(inputs)
        batch = M.BatchRecord(
            kind=kind,
            size=len(requests),
            preprocess_s=preprocess_s,
            prefill_s=timing["prefill_s"],
            decode_s=timing["decode_s"],
            e2e_s=preprocess_s + timing["call_s"],
            vision_s=timing["vision_s"],
            generated_tokens=generated,
            decode_tokens=decode_tokens,
            seconds_reducing=float(pact.api.stats(self._model).seconds_reducing),
            peak_memory_gb=self.memory.peak_gb(),
        )
        samples = [
            M.SampleRecord(
                task=_request_task(req),
                doc_id=_request_doc_id(req),
                kind=kind,
                visual_before=before[b],
                visual_after=after[b],
                layer_mean_visual=M.layer_mean_visual(before[b], steps[b], self.n_layers),
                batch=0,
                padding=bool((req.metadata or {}).get("__padding_only__", False)),
            )
            for b, req in enumerate(requests)
        ]
        self.recorder.add_batch(batch, samples)

    # --- end of run ----------------------------------------------------------------------------------

    def _gather(self, world_size: int, rank: int) -> M.RunRecorder | None:
        """All processes' records on rank 0 (None on the other ranks)."""
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(parts, self.recorder)
            return M.RunRecorder.merge(parts) if rank == 0 else None
        return self.recorder

    def finalize(
        self, run: Mapping[str, Any], *, world_size: int = 1, rank: int = 0
    ) -> dict[str, Any] | None:
        """Summarise the run, print the table, write the metrics JSON (rank 0). Idempotent.

        ``run``: what identifies the run in the file: ``model`` (``pact_<family>``), ``family``,
        ``pretrained``, ``label``, ``model_args``, ``batch_size``, ``device``. Returns the document
        written (None on ranks other than 0)."""
        if self._finalized:
            return self.doc
        self._finalized = True
        merged = self._gather(world_size, rank)
        if merged is None:
            return None
        summary = M.summarize(
            merged.samples, merged.batches, n_layers=self.n_layers, reference_layer=self.reference_layer
        )
        tracker, datetime_str = find_evaluation_context()
        date_id = (datetime_str or time.strftime("%Y%m%d_%H%M%S")).replace(":", "-")
        results_dir = None
        if tracker is not None and getattr(tracker, "output_path", None):
            sanitized = getattr(
                getattr(tracker, "general_config_tracker", None), "model_name_sanitized", None
            )
            results_dir = Path(tracker.output_path) / (sanitized or "")
        doc = {
            "pact_metrics_version": M.METRICS_VERSION,
            "date_id": date_id,
            "results_file": f"{date_id}_results.json" if results_dir is not None else None,
            "model": run["model"],
            "family": run["family"],
            "pretrained": run["pretrained"],
            "label": run["label"],
            "model_args": run["model_args"],
            "config": self._config.to_dict(),
            "tasks": sorted({s.task for s in merged.samples}),
            "world_size": world_size,
            "batch_size": run["batch_size"],
            "device": run["device"],
            "dtype": str(next(self._model.parameters()).dtype).replace("torch.", ""),
            "memory_kind": self.memory.kind,
            "summary": summary,
            "per_task": M.summarize_tasks(
                merged.samples, n_layers=self.n_layers, reference_layer=self.reference_layer
            ),
            **M.records_to_json(merged.samples, merged.batches),
        }
        self.doc = doc
        paths = []
        if results_dir is not None:
            paths.append(results_dir / f"{date_id}_pact_metrics.json")
        if self._config.log_output_path:
            name = Path(str(run["pretrained"]).rstrip("/")).name or "model"
            paths.append(Path(self._config.log_output_path) / f"{date_id}_{name}_pact_metrics.json")
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
        doc["written_to"] = [str(p) for p in paths]
        tasks = ",".join(doc["tasks"])
        title = f"pact metrics: {run['model']} {run['pretrained']} [{run['label']}] tasks={tasks}"
        print("\n" + M.format_table(summary, title=title, memory_kind=self.memory.kind), flush=True)
        if paths:
            print(f"pact metrics written to {', '.join(str(p) for p in paths)}", flush=True)
        else:
            print("pact metrics not written: give lmms-eval --output_path or log_output_path=DIR", flush=True)
        log_to_lmms_eval(summary)
        return doc

    def close(self) -> None:
        """Remove the timer's hooks from the model."""
        if self.timer is not None:
            self.timer.close()


def log_to_lmms_eval(summary: Mapping[str, Any]) -> None:
    """Put the key numbers in lmms-eval's own results JSON (``results["throughput"]``)."""
    try:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
    except ImportError:  # pragma: no cover
        return
    extra = {f"pact_{k}": summary[k] for k in THROUGHPUT_KEYS if summary.get(k) is not None}
    log_metrics(
        total_elapsed_time=float(summary.get("end_to_end_seconds_total") or 0.0),
        total_gen_tokens=int(summary.get("generated_tokens") or 0),
        avg_speed=float(summary.get("decode_tokens_per_second") or 0.0),
        additional_metrics=extra,
    )
