"""Evaluation records of one pass over a validation or test split.

Each batch adds its rows' target-token NLL (through the one scoring path, `talr.scoring`) and, when
the task scores generations, each row's greedy answer and the task's verdict. `finish` gathers the
records of every rank, asks the task for its metrics (accuracy, balanced accuracy, ...) and hands
back the records for the generations file and the task's figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from talr.generation import generate_texts
from talr.results import write_atomic
from talr.scoring import all_gather_objects, score_batch
from talr.tasks.base import Task, Verdict


@dataclass
class EvalRecord:
    row_index: int  # the row of the split
    verdict: Verdict
    text: str  # what the model generated


class DomainEvaluation:
    """Accumulates one evaluation pass; `finish` returns its metrics and records and starts over."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.records: list[EvalRecord] = []
        self.nll_sum = 0.0
        self.tokens = 0

    def add(self, net: nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], task: Task, rows: list[dict],
            max_new_tokens: int | None) -> None:
        """Score one evaluation batch; `max_new_tokens` None: the loss only, no generation."""
        nll = torch.cat(score_batch(net, batch))
        self.nll_sum += float(nll.double().sum())
        self.tokens += int(nll.numel())
        if max_new_tokens is None:
            return
        # Through the net: under FSDP2 its root hooks gather the embeddings and head for generate().
        texts = generate_texts(net, tokenizer, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens)
        for index, text in zip(batch["row_index"].tolist(), texts):
            self.records.append(EvalRecord(index, task.score(text, rows[index]), text))

    def finish(self, task: Task, rows: list[dict]) -> tuple[dict[str, float], list[EvalRecord]]:
        """Metrics over every rank's rows (each row once) and the records sorted by row; resets."""
        gathered = all_gather_objects((self.records, self.nll_sum, self.tokens))
        # A distributed sampler pads with repeats: score each row once.
        records = sorted({r.row_index: r for part in gathered for r in part[0]}.values(), key=lambda r: r.row_index)
        tokens = sum(part[2] for part in gathered)
        metrics = {"loss": sum(part[1] for part in gathered) / max(tokens, 1)}
        if records:
            metrics.update(task.summarize([r.verdict for r in records], [rows[r.row_index] for r in records]))
        self.reset()
        return metrics, records


def write_generations(path: Path, records: list[EvalRecord]) -> None:
    """Every scored generation as JSONL: what the model said, not just the score."""
    lines = [json.dumps({"row_index": r.row_index, "correct": r.verdict.correct, "parsed": r.verdict.parsed,
                         "answer": r.verdict.answer, "generation": r.text}) + "\n" for r in records]
    write_atomic(path, "".join(lines))
