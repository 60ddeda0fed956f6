"""Every bad input in the README's table, through `talr fit` as a user would run it.

Each case must stop with an error that names the problem (file, row, column or option) before a
single optimizer step, and leave what an earlier run wrote in the same directory byte for byte
as it was. The readers' finer cases are unit-tested in test_medcalc_task.py.
"""

import csv
import hashlib
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import build_cli
from conftest import MEDCALC_CSV

REPO = Path(__file__).resolve().parents[1]


def real_rows(n: int = 10) -> list[dict[str, str]]:
    with MEDCALC_CSV.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if len(r["Patient Note"]) < 600][:n]  # short notes keep the runs quick


def write_rows(path: Path, rows: list[dict[str, str]], drop: tuple[str, ...] = ()) -> Path:
    columns = [c for c in rows[0] if c not in drop] if rows else list(real_rows(1)[0])
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def earlier_run(out: Path) -> dict[Path, str]:
    """Files a finished run left in the directory, with their digests."""
    version = out / "tensorboard" / "version_0"
    files = {
        version / "checkpoints" / "last.ckpt": None,
        version / "generations" / "val_step000004.jsonl": b'{"row_index": 0}\n',
        version / "export" / "model.safetensors": b"weights",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            torch.save({"state_dict": {}, "global_step": 4}, path)
        else:
            path.write_bytes(data)
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def fit_args(tiny_model_dir: Path, out: Path, source: str | Path) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.model", str(tiny_model_dir),
        "--model.max_new_tokens", "4", "--data.task.init_args.source", str(source),
        "--data.val_size", "2", "--data.batch_size", "2", "--data.micro_batch_size", "2",
        "--data.max_length", "2048", "--trainer.max_steps", "1",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
    ]


def csv_with(tmp_path: Path, name: str, edit=None, drop: tuple[str, ...] = ()) -> Path:
    rows = real_rows()
    if edit:
        edit(rows)
    return write_rows(tmp_path / name, rows, drop)


def non_utf8(tmp_path: Path) -> Path:
    path = csv_with(tmp_path, "latin1.csv")
    data = path.read_bytes()
    cut = data.index(b"\n", data.index(b"\n") + 1) + 20  # inside the second data row
    path.write_bytes(data[:cut] + b"\xe9" + data[cut:])
    return path


def set_cell(row: int, column: str, value: str):
    def edit(rows):
        rows[row][column] = value
    return edit


# (case id, source file or None for the real CSV, extra arguments, what the error must say)
CASES = [
    ("missing file", lambda t: t / "no_such_file.csv", [], ["no_such_file.csv", "not found"]),
    ("wrong columns", lambda t: csv_with(t, "columns.csv", drop=("Ground Truth Answer",)), [],
     ["columns.csv", "Ground Truth Answer"]),
    ("empty target", lambda t: csv_with(t, "empty.csv", set_cell(3, "Ground Truth Explanation", " ")), [],
     ["empty.csv", "row 4", "Ground Truth Explanation"]),
    ("non-numeric limit", lambda t: csv_with(t, "limits.csv", set_cell(1, "Upper Limit", "n/a")), [],
     ["limits.csv", "row 2", "Upper Limit"]),
    ("non-UTF-8 bytes", non_utf8, [], ["latin1.csv", "UTF-8", "byte offset"]),
    ("row longer than max_length", lambda t: csv_with(t, "long.csv"),
     ["--data.max_length", "400", "--data.overlength", "error"], ["row", "of the source", "data.max_length=400"]),
    ("zero usable rows (all too long)", lambda t: csv_with(t, "long.csv"),
     ["--data.max_length", "300", "--data.overlength", "drop"], ["zero usable rows", "max_length=300"]),
    ("zero usable rows (header only)", lambda t: write_rows(t / "header.csv", []), [], ["header.csv", "no rows"]),
    ("unknown loss", lambda t: MEDCALC_CSV, ["--model.loss", "tarl"], ["unknown loss 'tarl'", "talr"]),
    ("negative learning rate", lambda t: MEDCALC_CSV, ["--model.learning_rate=-1e-5"],
     ["learning_rate must be positive", "-1e-05"]),
    ("zero val_size", lambda t: csv_with(t, "ok.csv"), ["--data.val_size", "0"], ["val_size=0"]),
]


@pytest.mark.parametrize("case, source, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_before_training_with_a_clear_error(case, source, extra, expected, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    before = earlier_run(out)
    with pytest.raises(Exception) as info:
        build_cli([*fit_args(tiny_model_dir, out, source(tmp_path)), *extra])
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
    assert [p for p in out.rglob("*.ckpt")] == [out / "tensorboard" / "version_0" / "checkpoints" / "last.ckpt"]
    for events in out.rglob("events.out.tfevents.*"):  # the logger may have opened its file; nothing was logged
        assert not EventAccumulator(str(events)).Reload().Tags()["scalars"]


def test_a_non_numeric_option_is_named_by_the_parser(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        build_cli([*fit_args(tiny_model_dir, tmp_path, MEDCALC_CSV), "--data.task.init_args.limit", "ten"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "limit" in err and "ten" in err


def test_a_checkpoint_of_another_model_is_refused_by_name(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": "HuggingFaceTB/SmolLM2-360M-Instruct"}}, ckpt)
    out = tmp_path / "run"
    before = earlier_run(out)
    with pytest.raises(ValueError, match=r"trained from model.model='HuggingFaceTB/SmolLM2-360M-Instruct'.*asks for '.*tiny-llama"):
        build_cli([*fit_args(tiny_model_dir, out, MEDCALC_CSV), "--ckpt_path", str(ckpt)])
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
