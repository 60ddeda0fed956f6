"""Progress without a terminal: `talr fit` with stdout in a file prints plain lines (step, loss,
tokens/s, time, memory) instead of a redrawn bar; talr's own loops print start / periodic / end lines."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_fit_config
from talr.progress import format_duration, track

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"[\d,]+(?:\.\d+)?"
DURATION = r"\d+[hms](?:\d\d[ms])?"  # 45s, 3m05s, 2h07m


def test_track_prints_start_periodic_and_end_lines_when_stdout_is_a_file(capsys):
    assert list(track(range(3), "scoring", interval_s=0.0)) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[scoring] started: 3 batches"
    # interval 0: a line after every item but the last, whose line is the end line
    assert [re.sub(r", .*", "", line) for line in lines[1:3]] == ["[scoring] 1/3 batches", "[scoring] 2/3 batches"]
    assert re.fullmatch(r"\[scoring\] done: 3 batches in \d+s", lines[3]) and len(lines) == 4
    assert list(track([4, 5], "quiet", enabled=False)) == [4, 5]
    assert capsys.readouterr().out == ""  # other ranks: silent


def test_durations_read_as_minutes_and_hours():
    assert [format_duration(s) for s in (0.4, 59.4, 61, 3599, 3600, 7 * 3600 + 5 * 60 + 59)] == \
        ["0s", "59s", "1m01s", "59m59s", "1h00m", "7h05m"]


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_talr_fit_with_stdout_in_a_file_prints_plain_progress_lines(tiny_model_dir, tmp_path):
    steps = 3
    config = tiny_fit_config(
        tiny_model_dir, tmp_path, "log", [
            {"class_path": "callbacks.forgetting_monitor.ForgettingMonitor", "init_args": {"max_new_tokens": 4}},
        ], validate_before_fit=True, trainer={"max_steps": steps, "val_check_interval": 2, "enable_progress_bar": True},
        model={"loss": "TALR", "learning_rate": 1e-3})
    log, errors = tmp_path / "fit.log", tmp_path / "fit.err"
    # a cold cache of the initial model's answers: an earlier test's entries would skip the pass this test reads
    env = {**os.environ, "TALR_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as out, errors.open("w") as err:  # a file, as under SLURM or nohup: not a terminal
        done = subprocess.run([sys.executable, "-m", "cli", "fit", "--config", str(config)], stdout=out, stderr=err,
                              cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, errors.read_text()[-3000:]
    text = log.read_text()
    assert "\r" not in text  # no bar redrawn with carriage returns
    train = [line for line in text.splitlines() if line.startswith("[train] step")]
    # the default pace (a line every 30 s) still gives the first and the last step their lines
    assert [int(re.match(r"\[train\] step (\d+)/", line)[1]) for line in train][0] == 1
    assert train[-1].startswith(f"[train] step {steps}/{steps} (100%)")
    logged = scalars(tmp_path / "tb" / "log")
    for line in train:
        step = int(re.match(r"\[train\] step (\d+)/", line)[1])
        loss = float(re.search(r"\| loss (\d+\.\d+) \|", line)[1])
        assert loss == pytest.approx(logged["train/loss"][step - 1], abs=5e-5)  # the step's loss, 4 decimals
        assert re.search(rf"\| tau {NUMBER}", line)  # TALR's own metric
        assert re.search(rf"\| {NUMBER} tokens/s \({NUMBER} target\) \| mfu {NUMBER}", line)
        assert re.search(rf"\| {DURATION} elapsed, ~{DURATION} left \| peak mem \d+\.\d\d GiB \(RSS\)$", line)
    first = float(re.search(rf"\| ({NUMBER}) tokens/s", train[0])[1].replace(",", ""))
    assert first == pytest.approx(logged["train/tokens_per_s"][0], abs=0.5)  # the first line covers step 1 alone
    assert re.search(rf"^\[train\] done: 3 steps in {DURATION} ", text, re.M)
    # validation passes: start and end lines (one batch of the 4 validation rows)
    assert re.search(r"^\[validation\] step 0: started, 1 batch$", text, re.M)
    assert re.search(rf"^\[validation\] step 2: done, 1 batch in {DURATION}$", text, re.M)
    # the forgetting monitor's initial answers: 55 built-in prompts in batches of 16
    assert f"[forgetting: initial answers] started: {math.ceil(55 / 16)} batches" in text
    assert re.search(rf"^\[forgetting: initial answers\] done: {math.ceil(55 / 16)} batches in {DURATION}$", text, re.M)
