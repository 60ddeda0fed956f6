"""Every bad input in the README's table, through `talr fit` as a user would run it.

Each case must stop before a single optimizer step with one line `talr: error: <message>` naming
the problem (file, row, column or option) and exit status 2, no traceback, and leave what an
earlier run wrote in the same directory byte for byte as it was. The readers' finer cases are
unit-tested in test_medcalc_task.py.
"""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cli
from cli import build_cli
from conftest import MEDCALC_CSV
from talr.errors import find_user_error
from talr.models import add_lora, check_model_name

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
    ("non-numeric answer", lambda t: csv_with(t, "answers.csv", set_cell(2, "Ground Truth Answer", "abc")), [],
     ["answers.csv", "row 3", "column 'Ground Truth Answer': 'abc' is not a number"]),
    ("model directory missing", lambda t: csv_with(t, "ok.csv"), ["--model.model", "/no/such/model-dir"],
     ["/no/such/model-dir: no such directory, and not a hub id (hub ids look like org/name)"]),
]


def one_line_error(stderr: str) -> str:
    """The `talr: error:` line, checked to be the only one and the last line."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("talr: error: ")]
    assert errors == lines[-1:], f"not one `talr: error:` line at the end: {lines[-5:]}"
    return errors[0]


@pytest.mark.parametrize("case, source, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_before_training_with_a_clear_error(case, source, extra, expected, tiny_model_dir, tmp_path,
                                                             capsys):
    out = tmp_path / "run"
    before = earlier_run(out)
    with pytest.raises(SystemExit) as info:  # any other exception would reach the user as a traceback
        cli.main([*fit_args(tiny_model_dir, out, source(tmp_path)), *extra])
    assert info.value.code == 2
    message = one_line_error(capsys.readouterr().err)
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
    assert [p for p in out.rglob("*.ckpt")] == [out / "tensorboard" / "version_0" / "checkpoints" / "last.ckpt"]
    for events in out.rglob("events.out.tfevents.*"):  # the logger may have opened its file; nothing was logged
        assert not EventAccumulator(str(events)).Reload().Tags()["scalars"]


def test_a_non_numeric_option_is_named_by_the_parser(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        build_cli([*fit_args(tiny_model_dir, tmp_path, MEDCALC_CSV), "--data.task.init_args.limit", "ten"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    # jsonargparse's report (usage, each type it tried) stays; talr's one line ends it
    assert "Expected a <class 'int'>" in err
    assert err.strip().splitlines()[-1] == "talr: error: data.task.limit: invalid value 'ten' (the reasons are above)"


def test_a_checkpoint_of_another_model_is_refused_by_name(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": "HuggingFaceTB/SmolLM2-360M-Instruct"}}, ckpt)
    out = tmp_path / "run"
    before = earlier_run(out)
    with pytest.raises(ValueError, match=r"trained from model.model='HuggingFaceTB/SmolLM2-360M-Instruct'.*asks for '.*tiny-llama"):
        build_cli([*fit_args(tiny_model_dir, out, MEDCALC_CSV), "--ckpt_path", str(ckpt)])
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before


def talr_console(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("talr")), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_the_console_script_prints_one_line_and_exits_2(tiny_model_dir, tmp_path):
    for name, edit, extra, expected in [
        ("answers.csv", set_cell(2, "Ground Truth Answer", "abc"), [],
         "row 3 (Row Number 62), column 'Ground Truth Answer': 'abc' is not a number"),
        ("ok.csv", None, ["--model.model", "./no-such-model"],
         "talr: error: ./no-such-model: no such directory, and not a hub id (hub ids look like org/name)"),
    ]:
        done = talr_console(*fit_args(tiny_model_dir, tmp_path / "run", csv_with(tmp_path, name, edit)), *extra)
        assert done.returncode == 2, done.stderr[-2000:]
        assert expected in one_line_error(done.stderr) and "Traceback" not in done.stderr


@pytest.mark.parametrize("how", ["--traceback", "TALR_DEBUG=1"])
def test_traceback_on_request(how, tiny_model_dir, tmp_path):
    args = fit_args(tiny_model_dir, tmp_path / "run", csv_with(tmp_path, "answers.csv", set_cell(2, "Ground Truth Answer", "abc")))
    done = talr_console(*args, *([how] if how.startswith("--") else []),
                        env={"TALR_DEBUG": "1"} if how == "TALR_DEBUG=1" else None)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "talr: error:" not in done.stderr
    assert 'talr/tasks/medcalc.py", line' in done.stderr  # where the row was refused
    assert done.stderr.strip().splitlines()[-1].startswith("talr.tasks.base.DataError: ")


def raised(function, *args):
    try:
        function(*args)
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return exc
    raise AssertionError(f"{function.__name__} raised nothing")


def test_user_errors_are_told_from_bugs():
    user = raised(check_model_name, "/no/such/dir")  # a `raise` in talr/models.py
    assert find_user_error(user) is user
    # a library wrapping it (as jsonargparse does, `raise ... from`) is looked through
    def wrap():
        raise ValueError("Call to compute_fn of link failed") from user
    assert find_user_error(raised(wrap)) is user
    # a ValueError raised inside a library is a bug to report with its traceback, not the user's mistake
    assert find_user_error(raised(json.loads, "{")) is None
    # so is one a builtin raised on a talr line (int("x") in add_lora), which no talr check made
    builtin = raised(add_lora, None, {"r": "x"})
    assert isinstance(builtin, ValueError) and find_user_error(builtin) is None
    assert find_user_error(raised(lambda: [].pop())) is None
