"""Offline lm-eval tasks for the general benchmarks, reading each benchmark's original files.

The YAMLs beside this file mirror lm-eval's standard task definitions (prompt, choices, few-shot
source, filters, metrics) and differ only in where the rows come from: a `custom_dataset` reader
(`readers.py`) over a local data directory. `write_task_dir(data_dir, out_dir)` renders them with
that directory filled in; the result is an lm-eval include path, for this package's callback and
for lm-eval's own CLI alike:

    python -m talr.lm_eval_tasks ../shared/data /tmp/talr_tasks
    lm_eval --model hf --model_args pretrained=<model dir> --tasks talr_arc_easy --include_path /tmp/talr_tasks
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from talr.lm_eval_tasks import readers

PACKAGE_DIR = Path(__file__).resolve().parent
MMLU_TEMPLATE = "_talr_mmlu_template_yaml"

# task name -> reader key in readers.FILES (talr_mmlu is a group over subjects)
LOCAL_TASKS: dict[str, str] = {
    "talr_arc_easy": "arc_easy",
    "talr_arc_challenge": "arc_challenge",
    "talr_piqa": "piqa",
    "talr_hellaswag": "hellaswag",
    "talr_mmlu": "mmlu",
    "talr_gsm8k": "gsm8k",
    "talr_ifeval": "ifeval",
    "talr_humaneval": "humaneval",
}
IFEVAL_TASKS = ("talr_ifeval", "ifeval")
CODE_TASKS = ("talr_humaneval", "humaneval")


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, from lm-eval's own MMLU config generator (one source of truth)."""
    from lm_eval.tasks.mmlu._generate_configs import SUBJECTS

    return sorted(SUBJECTS)


def required_files(task: str) -> list[str]:
    """Files (relative to the data directory; `a|b` = either) that a local task reads."""
    if task not in LOCAL_TASKS:
        raise KeyError(f"{task!r} is not a local talr task; local tasks: {', '.join(LOCAL_TASKS)}")
    if task == "talr_mmlu":
        return [rel for subject in mmlu_subjects() for rel in readers.mmlu_files(subject).values()]
    return list(readers.FILES[LOCAL_TASKS[task]].values())


def check_data_files(tasks: list[str], data_dir: str | Path) -> None:
    """Raise FileNotFoundError naming every file the local `tasks` need that `data_dir` lacks."""
    missing = []
    for task in tasks:
        for rel in required_files(task):
            if not any((Path(data_dir) / option).is_file() for option in rel.split("|")):
                missing.append(f"{task}: {Path(data_dir) / rel.split('|')[0]}")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} benchmark file(s) missing under data_dir={str(data_dir)!r} "
            f"(set by {readers.DATA_DIR_HINT}): " + "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        )


def write_task_dir(data_dir: str | Path, out_dir: str | Path) -> Path:
    """Render every local task for `data_dir` into `out_dir` and return it (an lm-eval include path)."""
    data = Path(data_dir).expanduser().resolve()
    if not data.is_dir():
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a directory (set by {readers.DATA_DIR_HINT})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_json = json.dumps(str(data))  # a JSON string is a valid double-quoted YAML scalar
    for source in sorted(PACKAGE_DIR.glob("talr_*.yaml")):
        text = source.read_text().rstrip("\n")
        (out / source.name).write_text(f"{text}\ndataset_kwargs:\n  data_dir: {data_json}\n")
    shutil.copyfile(PACKAGE_DIR / MMLU_TEMPLATE, out / MMLU_TEMPLATE)
    subjects = mmlu_subjects()
    for subject in subjects:
        description = json.dumps(f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n")
        (out / f"talr_mmlu_{subject}.yaml").write_text(
            f"include: {MMLU_TEMPLATE}\ntask: talr_mmlu_{subject}\ntask_alias: {subject}\n"
            f"description: {description}\ndataset_kwargs:\n  data_dir: {data_json}\n  subject: {subject}\n"
        )
    members = "".join(f"  - talr_mmlu_{subject}\n" for subject in subjects)
    (out / "talr_mmlu.yaml").write_text(
        "group: talr_mmlu\ntask:\n" + members
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n"
    )
    return out


def check_ifeval_requirements() -> None:
    """Fail now, with the fix, where lm-eval's IFEval scorer would fail (or try the network) later.

    lm-eval's ifeval imports langdetect and immutabledict, and counts sentences with NLTK's Punkt
    model `punkt_tab`; when that data is missing its import tries `nltk.download`.
    """
    missing = []
    for module in ("langdetect", "immutabledict"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ModuleNotFoundError(
            f"IFEval needs the Python package(s) {', '.join(missing)}: pip install 'lm-eval[ifeval]' "
            f"(or pip install {' '.join(missing)})"
        )
    from nltk.tokenize import PunktTokenizer

    try:
        PunktTokenizer("english")  # what lm-eval's sentence counter loads
    except LookupError as err:
        raise LookupError(
            "IFEval needs NLTK's 'punkt_tab' data (English Punkt model), which was not found in "
            "nltk.data.path. Install it with: python -m nltk.downloader punkt_tab ; offline, run "
            "`python -m nltk.downloader -d <dir> punkt_tab` where there is network, copy <dir> over "
            "and set NLTK_DATA=<dir>"
        ) from err
