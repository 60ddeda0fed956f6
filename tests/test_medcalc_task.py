"""MedCalc task: reading and validating MedCalc-Bench data, the Table 4 prompt, and the scorer."""

from __future__ import annotations

import collections
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from talr.tasks.base import DataError, Verdict
from talr.tasks import medcalc as medcalc_module
from talr.tasks.medcalc import (
    MedCalc,
    extract_answer,
    parse_date,
    parse_number,
    parse_weeks_days,
)

REAL_CSV = Path(__file__).resolve().parents[2] / "shared/data/medcalc/medcalc_bench_test.csv"
COLUMNS = [
    "Row Number", "Calculator ID", "Calculator Name", "Category", "Output Type", "Note ID",
    "Note Type", "Patient Note", "Question", "Relevant Entities", "Ground Truth Answer",
    "Lower Limit", "Upper Limit", "Ground Truth Explanation",
]


@pytest.fixture(scope="module")
def real_rows() -> list[dict[str, str]]:
    return MedCalc(source=str(REAL_CSV)).read()


def make_row(output_type: str, answer: str, lower: str = "", upper: str = "", **extra: str) -> dict:
    row = {
        "Row Number": "1",
        "Calculator ID": "2",
        "Calculator Name": "Creatinine Clearance (Cockcroft-Gault Equation)",
        "Category": "lab",
        "Output Type": output_type,
        "Note ID": "n1",
        "Note Type": "Template",
        "Patient Note": "A 60-year-old man weighing 70 kg.",
        "Question": "What is the patient's creatinine clearance?",
        "Relevant Entities": "{}",
        "Ground Truth Answer": answer,
        "Lower Limit": lower or answer,
        "Upper Limit": upper or answer,
        "Ground Truth Explanation": "Compute it step by step.",
    }
    row.update(extra)
    return row


def answer_block(value: str) -> str:
    return f"reasoning\n</think>\n<answer>\n{value}\n</answer>"


# ------------------------------------------------------------------------------- real data


def test_reads_real_csv_with_independent_counts(real_rows):
    with REAL_CSV.open(encoding="utf-8", newline="") as f:
        expected = list(csv.DictReader(f))
    counts = collections.Counter(row["Output Type"] for row in expected)
    assert len(expected) == 1047
    assert counts == {"decimal": 627, "integer": 380, "date": 40}
    assert len(real_rows) == 1047
    assert collections.Counter(row["Output Type"] for row in real_rows) == counts
    assert real_rows[0] == expected[0]
    assert all(isinstance(v, str) for row in real_rows for v in row.values())


def test_every_real_row_scores_its_own_target(real_rows):
    task = MedCalc(source=str(REAL_CSV))
    failures = []
    for row in real_rows:
        verdict = task.score(task.target(row), row)
        expected = Verdict(correct=True, parsed=True, answer=row["Ground Truth Answer"])
        if verdict != expected:
            failures.append((row["Row Number"], row["Ground Truth Answer"], verdict))
    assert failures == []


def test_perturbed_real_decimals_score_wrong(real_rows):
    task = MedCalc(source=str(REAL_CSV))
    decimals = [row for row in real_rows if row["Output Type"] == "decimal"]
    assert len(decimals) == 627
    for row in decimals:
        upper = float(row["Upper Limit"])
        wrong = upper + abs(upper) * 0.5 + 1  # upper * 1.5 + 1, moved above upper for negatives too
        verdict = task.score(answer_block(json.dumps({"answer": str(wrong)})), row)
        assert verdict.parsed and not verdict.correct, (row["Row Number"], wrong)


def test_limit_keeps_first_rows(real_rows):
    rows = MedCalc(source=str(REAL_CSV), limit=5).read()
    assert rows == real_rows[:5]
    with pytest.raises(ValueError):
        MedCalc(source=str(REAL_CSV), limit=0)


# --------------------------------------------------------------------- prompt and target


def test_prompt_messages_follow_table_4():
    row = make_row("decimal", "25.238", "23.9761", "26.4999")
    task = MedCalc(source=str(REAL_CSV))
    messages = task.prompt_messages(row)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == (
        "You are a helpful assistant. You first think about the reasoning process in the mind "
        "and then provide the user with the answer."
    )
    expected_user = (
        "You are a helpful assistant for calculating a score for a given patient note. Please "
        "think step-by-step to solve the question and then generate the required score.\n"
        "Here is the patient note:\n"
        "A 60-year-old man weighing 70 kg.\n"
        "Here is the task:\n"
        "What is the patient's creatinine clearance?\n"
        "Please show your entire reasoning process in a single <think> </think> block (do not "
        "open or close the tag more than once).\n"
        "Your final response must be in JSON format within <answer> </answer> tags. For example,\n"
        "<think>\n"
        "[entire reasoning process here]\n"
        "</think>\n"
        "<answer>\n"
        '{"answer": str(short_and_direct_answer_of_the_question)}\n'
        "</answer>"
    )
    assert messages[1]["content"] == expected_user
    assert task.assistant_prefix(row) == "Let me solve this step by step.\n<think>\n"


def test_prompt_keeps_real_note_and_question_verbatim(real_rows):
    task = MedCalc(source=str(REAL_CSV))
    for row in real_rows[:50]:
        user = task.prompt_messages(row)[1]["content"]
        assert f"Here is the patient note:\n{row['Patient Note']}\nHere is the task:\n" in user
        assert f"\n{row['Question']}\nPlease show" in user


def test_target_and_group_keys():
    task = MedCalc(source=str(REAL_CSV))
    row = make_row("integer", "('34 weeks', '6 days')", **{
        "Ground Truth Explanation": '  The "LMP" was 34 weeks ago.\n',
        "Calculator Name": "Estimated Gestational Age",
        "Category": "date",
    })
    assert task.target(row) == (
        'The "LMP" was 34 weeks ago.\n</think>\n<answer>\n'
        '{"answer": "(\'34 weeks\', \'6 days\')"}\n</answer>'
    )
    quoted = make_row("decimal", 'say "5"', "4", "6")
    assert '{"answer": "say \\"5\\""}' in task.target(quoted)
    assert task.group_keys(row) == {"category": "date", "calculator": "Estimated Gestational Age"}


# ----------------------------------------------------------------------------------- scoring


def score(row: dict, generation: str) -> Verdict:
    return MedCalc(source=str(REAL_CSV)).score(generation, row)


DECIMAL = make_row("decimal", "25.238", "23.9761", "26.4999")


@pytest.mark.parametrize(
    "generation, correct",
    [
        (answer_block('{"answer": "25.238"}'), True),
        (answer_block('{"answer": "23.9761"}'), True),  # at the lower limit
        (answer_block('{"answer": "26.4999"}'), True),  # at the upper limit
        (answer_block('{"answer": "23.976"}'), False),  # just below
        (answer_block('{"answer": "26.5"}'), False),  # just above
        (answer_block('{"answer": "30"}'), False),
        (answer_block('{"answer": "25.2 mL/min"}'), True),  # units
        (answer_block('{"answer": 25.2}'), True),  # unquoted number
        (answer_block("{answer: 25.2}"), True),  # unquoted key
        (answer_block("{'answer': '25.2'}"), True),  # single quotes
        (answer_block('{"answer": "25.2"} and some trailing words'), True),
        (answer_block("25.2 mL/min"), True),  # bare value, no JSON
        (answer_block("```json\n{\"answer\": \"25.2\"}\n```"), True),  # fenced JSON
        ('reasoning</think><answer>{"answer": "25.2"}', True),  # no closing tag
        ('<answer>{"answer": "25.2"}</answer>\n\nextra garbage <think> tokens', True),
        ('<answer>{"answer": 25.2}</answer> later <answer>{"answer": 99}</answer>', False),
        ('<answer>{"answer": 99}</answer> later <answer>{"answer": 25.2}</answer>', True),
    ],
)
def test_decimal_scoring(generation, correct):
    verdict = score(DECIMAL, generation)
    assert verdict.parsed
    assert verdict.correct is correct


def test_decimal_thousands_and_negatives():
    big = make_row("decimal", "1234.5", "1172.775", "1296.225")
    assert score(big, answer_block('{"answer": "1,234.5 mg"}')).correct
    assert not score(big, answer_block('{"answer": "1.2345"}')).correct
    negative = make_row("decimal", "-2.14", "-2.247", "-2.033")
    assert score(negative, answer_block('{"answer": -2.1}')).correct
    assert not score(negative, answer_block('{"answer": 2.1}')).correct
    assert score(negative, answer_block("{answer: \u22122.1}")).correct  # unicode minus


def test_verdict_answer_is_extracted_text():
    verdict = score(DECIMAL, answer_block('{"answer": "25.2 mL/min"}'))
    assert verdict == Verdict(correct=True, parsed=True, answer="25.2 mL/min")


@pytest.mark.parametrize(
    "answer, correct",
    [("4", True), ("4.0", True), ("4.4", True), ("4.6", False), ("3.6", True), ("5", False),
     ("4 points", True), ("The score is 4.", True), ("-4", False)],
)
def test_integer_scoring(answer, correct):
    row = make_row("integer", "4", Category="risk", **{"Calculator Name": "CHA2DS2-VASc"})
    verdict = score(row, answer_block(json.dumps({"answer": answer})))
    assert verdict.parsed and verdict.correct is correct


def test_integer_negative_and_unquoted():
    row = make_row("integer", "-2", **{"Calculator Name": "Wells' Criteria for DVT"})
    assert score(row, answer_block('{"answer": -2}')).correct
    assert score(row, answer_block("{answer: -2}")).correct
    assert not score(row, answer_block('{"answer": 2}')).correct


@pytest.mark.parametrize(
    "answer, correct, parsed",
    [
        ("09/23/2014", True, True),
        ("9/23/2014", True, True),
        ("09-23-2014", True, True),
        ("2014-09-23", True, True),
        ("The estimated due date is 09/23/2014.", True, True),
        ("09/24/2014", False, True),
        ("2014-09-24", False, True),
        ("23/09/2014", False, False),  # day first: month 23 does not exist
        ("September", False, False),
    ],
)
def test_date_scoring(answer, correct, parsed):
    row = make_row("date", "09/23/2014", **{"Calculator Name": "Estimated Due Date"})
    verdict = score(row, answer_block(json.dumps({"answer": answer})))
    assert (verdict.correct, verdict.parsed) == (correct, parsed)


GESTATIONAL = make_row(
    "integer", "('34 weeks', '6 days')", Category="date",
    **{"Calculator Name": "Estimated Gestational Age"},
)


@pytest.mark.parametrize(
    "answer_json, correct",
    [
        ('{"answer": "(\'34 weeks\', \'6 days\')"}', True),
        ("{'answer': '('34 weeks', '6 days')'}", True),
        ('{"answer": "(34, 6)"}', True),
        ('{"answer": [34, 6]}', True),
        ('{"answer": ["34 weeks", "6 days"]}', True),
        ('{"answer": "34 weeks and 6 days"}', True),
        ("34 weeks, 6 days", True),
        ('{"answer": "(34, 5)"}', False),
        ('{"answer": "35 weeks and 6 days"}', False),
        ('{"answer": "6 days"}', False),
    ],
)
def test_gestational_age_scoring(answer_json, correct):
    verdict = score(GESTATIONAL, answer_block(answer_json))
    assert verdict.parsed and verdict.correct is correct


def test_gestational_age_zero_days():
    row = make_row("integer", "('34 weeks', '0 days')")
    assert score(row, answer_block('{"answer": "34 weeks"}')).correct
    assert not score(row, answer_block('{"answer": "34"}')).parsed


@pytest.mark.parametrize(
    "generation",
    [
        "The answer is 25.2",  # no answer tag
        "",
        "<answer></answer>",
        "<answer>   </answer>",
        answer_block("I cannot determine this."),
        answer_block('{"answer": null}'),
        answer_block('{"answer": ""}'),
        answer_block("\u2022\u2022\u2022 ???"),
    ],
)
def test_unparseable_answers(generation):
    verdict = score(DECIMAL, generation)
    assert verdict.parsed is False
    assert verdict.correct is False


def test_unparseable_for_each_output_type():
    integer = make_row("integer", "4")
    date_row = make_row("date", "09/23/2014")
    for row in (integer, date_row, GESTATIONAL):
        assert score(row, "no tag at all") == Verdict(correct=False, parsed=False)
        assert not score(row, answer_block("garbage")).parsed


def test_model_text_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # payloads use a relative, digit-free file name
    payloads = [
        "__import__('pathlib').Path('pwned').touch()",
        '{"answer": __import__("pathlib").Path("pwned").touch()}',
        "{'answer': exec(\"open('pwned', 'w').close()\")}",
        "{\"answer\": \"__import__('os').system('touch pwned')\"}",
    ]
    for row in (DECIMAL, make_row("integer", "4"), make_row("date", "09/23/2014"), GESTATIONAL):
        for payload in payloads:
            verdict = score(row, answer_block(payload))
            assert verdict == Verdict(correct=False, parsed=False, answer=verdict.answer)
    assert not (tmp_path / "pwned").exists()


def test_helpers():
    assert extract_answer("no tags") is None
    assert extract_answer('<answer>{"Answer": "7"}</answer>') == "7"
    assert parse_number("about 1,234,567.5 units") == 1234567.5
    assert parse_number("CURB-65 score: 2") == 65.0  # first number, sign kept only when free
    assert parse_number("x = -3.5") == -3.5
    assert parse_number("1e999") is None
    assert parse_number("none") is None
    assert parse_date("on 2/29/2020") is not None and parse_date("2/30/2020") is None
    assert parse_weeks_days("('22 weeks', '2 days')") == (22, 2)
    assert parse_weeks_days("no numbers") is None


# ------------------------------------------------------------------------------- validation


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or COLUMNS
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def good_rows() -> list[dict]:
    return [
        make_row("decimal", "25.238", "23.9761", "26.4999", **{"Row Number": "11"}),
        make_row("integer", "4", **{"Row Number": "12"}),
        make_row("date", "09/23/2014", **{"Row Number": "13"}),
    ]


def read_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        MedCalc(source=str(path)).read()
    return str(info.value)


def test_small_good_csv_reads(tmp_path):
    path = write_csv(tmp_path / "good.csv", good_rows())
    rows = MedCalc(source=str(path)).read()
    assert [r["Row Number"] for r in rows] == ["11", "12", "13"]


def test_optional_calculator_id(tmp_path):
    columns = [c for c in COLUMNS if c not in ("Calculator ID", "Row Number", "Note ID")]
    path = write_csv(tmp_path / "lean.csv", good_rows(), columns)
    assert len(MedCalc(source=str(path)).read()) == 3


def test_missing_file(tmp_path):
    message = read_error(tmp_path / "absent.csv")
    assert "absent.csv" in message and "not found" in message


def test_missing_column(tmp_path):
    columns = [c for c in COLUMNS if c not in ("Upper Limit", "Category")]
    message = read_error(write_csv(tmp_path / "nocol.csv", good_rows(), columns))
    assert "nocol.csv" in message and "Upper Limit" in message and "Category" in message


@pytest.mark.parametrize("column", ["Ground Truth Explanation", "Ground Truth Answer"])
def test_empty_target_cells(tmp_path, column):
    rows = good_rows()
    rows[1][column] = "   "
    message = read_error(write_csv(tmp_path / "empty_cell.csv", rows))
    assert "empty_cell.csv" in message
    assert "row 2" in message and "Row Number 12" in message and column in message


@pytest.mark.parametrize("column", ["Lower Limit", "Upper Limit"])
def test_non_numeric_decimal_limit(tmp_path, column):
    rows = good_rows()
    rows[0][column] = "about 24"
    message = read_error(write_csv(tmp_path / "limits.csv", rows))
    assert "limits.csv" in message and "row 1" in message and column in message


def test_bad_output_type(tmp_path):
    rows = good_rows()
    rows[2]["Output Type"] = "fraction"
    message = read_error(write_csv(tmp_path / "types.csv", rows))
    assert "types.csv" in message and "row 3" in message and "Output Type" in message


def test_bad_ground_truth_for_integer_and_date(tmp_path):
    rows = good_rows()
    rows[1]["Ground Truth Answer"] = "four"
    message = read_error(write_csv(tmp_path / "int.csv", rows))
    assert "int.csv" in message and "row 2" in message and "Ground Truth Answer" in message
    rows = good_rows()
    rows[2]["Ground Truth Answer"] = "next spring"
    message = read_error(write_csv(tmp_path / "date.csv", rows))
    assert "date.csv" in message and "row 3" in message and "Ground Truth Answer" in message


def test_non_utf8_bytes(tmp_path):
    path = write_csv(tmp_path / "latin1.csv", good_rows())
    data = path.read_bytes()
    offset = data.index(b"70 kg")
    path.write_bytes(data[:offset] + b"\xff" + data[offset:])
    message = read_error(path)
    assert "latin1.csv" in message and f"byte offset {offset}" in message


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert "empty.csv" in read_error(empty)
    header_only = write_csv(tmp_path / "header.csv", [])
    message = read_error(header_only)
    assert "header.csv" in message and "no rows" in message


def test_ragged_row_is_not_dropped(tmp_path):
    path = write_csv(tmp_path / "ragged.csv", good_rows())
    with path.open("a", encoding="utf-8") as f:
        f.write("14,2,Short row\n")
    message = read_error(path)
    assert "ragged.csv" in message and "row 4" in message


def test_jsonl_and_json_sources(tmp_path):
    rows = good_rows()
    rows[1]["Ground Truth Answer"] = 4  # numbers in JSON become strings
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    read = MedCalc(source=str(jsonl)).read()
    assert len(read) == 3 and read[1]["Ground Truth Answer"] == "4"
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    assert MedCalc(source=str(as_json)).read() == read

    del rows[2]["Question"]
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    message = read_error(as_json)
    assert "rows.json" in message and "row 3" in message and "Question" in message
    jsonl.write_text('{"broken": \n', encoding="utf-8")
    assert "rows.jsonl" in read_error(jsonl)


def test_hub_id_dispatch(monkeypatch, tmp_path):
    calls = []

    def fake_hub(dataset_id: str, split: str) -> list[dict]:
        calls.append((dataset_id, split))
        return [{**r, "Row Number": int(r["Row Number"])} for r in good_rows()]

    monkeypatch.setattr(medcalc_module, "_read_hub", fake_hub)
    monkeypatch.chdir(tmp_path)  # no local path called ncbi/MedCalc-Bench-v1.0 here
    rows = MedCalc(source="ncbi/MedCalc-Bench-v1.0", split="test", limit=2).read()
    assert calls == [("ncbi/MedCalc-Bench-v1.0", "test")]
    assert [r["Row Number"] for r in rows] == ["11", "12"]
    # A path with a data-file suffix is never taken for a hub id.
    assert "not found" in read_error(Path("data/missing.csv"))
    assert calls == [("ncbi/MedCalc-Bench-v1.0", "test")]


def test_import_is_light():
    code = (
        "import sys, talr.tasks.medcalc; "
        "assert not {'torch', 'transformers', 'datasets'} & set(sys.modules), sys.modules.keys()"
    )
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


# ------------------------------------------------------------------------------- summarize


def test_summarize_per_category_by_hand():
    task = MedCalc(source=str(REAL_CSV))
    lab_a = make_row("decimal", "25.238", "23.9761", "26.4999")
    lab_b = make_row("decimal", "10", "9.5", "10.5", **{"Calculator Name": "Anion Gap"})
    risk = make_row("integer", "4", Category="risk", **{"Calculator Name": "CHA2DS2-VASc"})
    due = make_row("date", "09/23/2014", Category="date", **{"Calculator Name": "Due Date"})
    rows = [lab_a, lab_b, risk, due]
    generations = [
        answer_block('{"answer": 25.0}'),  # correct
        answer_block('{"answer": 12}'),  # wrong
        answer_block('{"answer": "4"}'),  # correct
        "no answer",  # unparsed
    ]
    verdicts = [task.score(g, r) for g, r in zip(generations, rows)]
    assert [(v.correct, v.parsed) for v in verdicts] == [
        (True, True), (False, True), (True, True), (False, False)
    ]
    summary = task.summarize(verdicts, rows)
    assert summary["accuracy"] == 0.5
    assert summary["unparsed"] == 1.0
    assert summary["count"] == 4.0
    assert summary["accuracy/category/lab"] == 0.5
    assert summary["accuracy/category/risk"] == 1.0
    assert summary["accuracy/category/date"] == 0.0
    assert summary["accuracy/calculator/Anion Gap"] == 0.0
    assert summary["accuracy/calculator/Creatinine Clearance (Cockcroft-Gault Equation)"] == 1.0


@pytest.mark.parametrize("row_index, output_type", [(0, "decimal"), (1, "integer")])
def test_non_numeric_answer_of_a_number_calculator(tmp_path, row_index, output_type):
    rows = good_rows()
    assert rows[row_index]["Output Type"] == output_type
    rows[row_index]["Ground Truth Answer"] = "abc"
    message = read_error(write_csv(tmp_path / "answers.csv", rows))
    row_number = rows[row_index]["Row Number"]
    assert message.startswith(f"{tmp_path / 'answers.csv'} row {row_index + 1} (Row Number {row_number}), "
                              "column 'Ground Truth Answer': 'abc' is not a number")
    rows[row_index]["Ground Truth Answer"] = " 1e3 " if output_type == "decimal" else "('34 weeks', '6 days')"
    assert len(MedCalc(source=str(write_csv(tmp_path / "answers.csv", rows))).read()) == 3  # numbers, weeks-days pass
