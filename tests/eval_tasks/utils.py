"""A tiny offline lmms-eval task for the tests and for trying the scripts without downloads.

``pact_tiny.parquet`` (next to this file) holds 8 documents: 7 synthetic images of different sizes
(so batches mix visual-token counts) and one text-only question (the third, so that ``--limit 4``
still mixes it into an image batch). It is rebuilt deterministically
from ``pact.testing.sample_image`` when missing. The YAMLs refer to it by a path relative to the
repository root, so run lmms-eval from there (the scripts ``cd`` there):

    python -m lmms_eval --model pact_qwen2_vl --model_args pretrained=/tmp/tiny_qwen \\
        --tasks pact_tiny_vqa,pact_tiny_mc --include_path tests/eval_tasks --output_path /tmp/out

Tasks: ``pact_tiny_vqa`` (generate_until, exact match) and ``pact_tiny_mc`` (multiple choice, i.e.
log-likelihood requests, accuracy); the group ``pact_tiny`` runs both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PARQUET = Path(__file__).resolve().parent / "pact_tiny.parquet"

# (question, answer, choices, image size or None for a text-only document)
_DOCS: tuple[tuple[str, str, tuple[str, ...], tuple[int, int] | None], ...] = (
    ("What color is the largest shape?", "red", ("red", "green", "blue"), (96, 64)),
    ("Is there a circle in the picture?", "yes", ("yes", "no"), (64, 96)),
    ("Answer with yes or no: is the sky green?", "no", ("yes", "no"), None),
    ("What color is the background?", "blue", ("red", "green", "blue"), (128, 96)),
    ("How many shapes are there?", "3", ("2", "3", "4"), (80, 80)),
    ("Is the picture dark?", "no", ("yes", "no"), (112, 56)),
    ("What is in the picture?", "shapes", ("shapes", "a cat"), (56, 112)),
    ("What color is the smallest shape?", "green", ("red", "green", "blue"), (100, 70)),
)


def build_parquet(path: Path = PARQUET) -> Path:
    """Write the 8 documents (with PNG-encoded images) to ``path``."""
    from datasets import Dataset, Features, Image, Sequence, Value

    from pact.testing import sample_image

    rows: dict[str, list[Any]] = {"id": [], "question": [], "answer": [], "choices": [], "image": []}
    for i, (question, answer, choices, size) in enumerate(_DOCS):
        rows["id"].append(i)
        rows["question"].append(question)
        rows["answer"].append(answer)
        rows["choices"].append(list(choices))
        rows["image"].append(None if size is None else sample_image(seed=i, size=size))
    features = Features(
        {
            "id": Value("int32"),
            "question": Value("string"),
            "answer": Value("string"),
            "choices": Sequence(Value("string")),
            "image": Image(),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


if not PARQUET.exists():  # lmms-eval imports this module before it loads the dataset
    build_parquet(PARQUET)


def doc_to_visual(doc: dict) -> list:
    return [] if doc["image"] is None else [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])


def doc_to_target_index(doc: dict) -> int:
    return list(doc["choices"]).index(doc["answer"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"].lower())}
