"""The synthetic MedCalc-Bench generator: answers recomputed independently, schema, limits,
determinism, coverage and variety of the notes."""

from __future__ import annotations

import json
import math
import random
import re
from datetime import date, datetime, timedelta

import pytest

from talr.tasks import medcalc_synth as synth
from talr.tasks.medcalc_synth import CALCULATORS, generate_rows

SCHEMA = (
    "Row Number", "Calculator ID", "Calculator Name", "Category", "Output Type", "Note ID",
    "Note Type", "Patient Note", "Question", "Relevant Entities", "Ground Truth Answer",
    "Lower Limit", "Upper Limit", "Ground Truth Explanation",
)
CATEGORIES = {"lab", "risk", "physical", "severity", "diagnosis", "date", "dosage"}
ROWS_PER_CALCULATOR = 50


def rows_of(key: str, n: int = ROWS_PER_CALCULATOR, seed: int = 123) -> list[dict[str, str]]:
    return generate_rows(n, seed=seed, calculators=[key])


# ----------------------------------------------------------- independent reference formulas
# Written again from the public formulas; none of these call the module under test.


def kg(entity) -> float:
    value, unit = entity
    return {"kg": value, "lb": value * 0.45359237}[unit]


def metres(entity) -> float:
    value, unit = entity
    return {"cm": value / 100, "m": value, "in": value * 0.0254}[unit]


def creatinine_mg_dl(entity) -> float:
    value, unit = entity
    return {"mg/dL": value, "µmol/L": value / 88.4}[unit]


def calcium_mg_dl(entity) -> float:
    value, unit = entity
    return {"mg/dL": value, "mmol/L": value * 4.008}[unit]


def albumin_g_dl(entity) -> float:
    value, unit = entity
    return {"g/dL": value, "g/L": value / 10}[unit]


def reference(key: str, e: dict):
    if key == "bmi":
        return kg(e["weight"]) / metres(e["height"]) ** 2
    if key == "map":
        sbp, dbp = e["Systolic Blood Pressure"][0], e["Diastolic Blood Pressure"][0]
        return sbp / 3 + 2 * dbp / 3
    if key == "crcl":
        female = e["sex"] == "Female"
        return ((140 - e["age"][0]) * kg(e["weight"]) * (0.85 if female else 1)
                / (72 * creatinine_mg_dl(e["creatinine"])))
    if key == "anion_gap":
        return e["Sodium"][0] - e["Chloride"][0] - e["Bicarbonate"][0]
    if key == "calcium":
        return calcium_mg_dl(e["Calcium"]) + 0.8 * (4 - albumin_g_dl(e["Albumin"]))
    if key == "qtc_bazett":
        rr_seconds = 60 / e["Heart Rate or Pulse"][0]
        return e["QT interval"][0] / math.sqrt(rr_seconds)
    if key == "cha2ds2_vasc":
        age = e["age"][0]
        points = [
            e["Congestive Heart Failure"], e["Hypertension history"],
            2 if age >= 75 else 0, e["Diabetes history"],
            2 if (e["Stroke"] or e["Transient Ischemic Attacks History"]
                  or e["Thromboembolism history"]) else 0,
            e["Vascular disease history"], 1 if 65 <= age < 75 else 0, e["sex"] == "Female",
        ]
        return sum(int(p) for p in points)
    if key == "curb_65":
        return sum([
            e["Confusion"],
            e["Blood Urea Nitrogen (BUN)"][0] > 19,
            e["respiratory rate"][0] >= 30,
            e["Systolic Blood Pressure"][0] < 90 or e["Diastolic Blood Pressure"][0] <= 60,
            e["age"][0] >= 65,
        ])
    if key == "wells_pe":
        score = 0.0
        score += 3 if e["Clinical signs and symptoms of DVT"] else 0
        score += 3 if e["Pulmonary Embolism is #1 diagnosis OR equally likely"] else 0
        score += 1.5 if e["Heart Rate or Pulse"][0] > 100 else 0
        score += 1.5 if (e["Immobilization for at least 3 days"]
                         or e["Surgery in the previous 4 weeks"]) else 0
        score += 1.5 if (e["Previously Documented Pulmonary Embolism"]
                         or e["Previously documented Deep Vein Thrombosis"]) else 0
        score += 1 if e["Hemoptysis"] else 0
        score += 1 if e["Malignancy with treatment within 6 months or palliative"] else 0
        return score
    if key == "due_date":
        lmp = datetime.strptime(e["Last menstrual date"], "%m/%d/%Y").date()
        return lmp + timedelta(weeks=40) + timedelta(days=e["cycle length"] - 28)
    raise AssertionError(f"no reference formula for {key}")


def key_numbers(key: str, e: dict) -> list:
    """The inputs a reader must find in the note."""
    pick = {
        "bmi": ["weight", "height"],
        "map": ["Systolic Blood Pressure", "Diastolic Blood Pressure"],
        "crcl": ["age", "weight", "creatinine"],
        "anion_gap": ["Sodium", "Chloride", "Bicarbonate"],
        "calcium": ["Calcium", "Albumin"],
        "qtc_bazett": ["Heart Rate or Pulse", "QT interval"],
        "cha2ds2_vasc": ["age"],
        "curb_65": ["age", "Blood Urea Nitrogen (BUN)", "respiratory rate",
                    "Systolic Blood Pressure", "Diastolic Blood Pressure"],
        "wells_pe": ["Heart Rate or Pulse"],
        "due_date": ["cycle length"],
    }[key]
    return [e[name][0] if isinstance(e[name], list) else e[name] for name in pick]


def shown(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def contains_number(text: str, value) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(shown(value))}(?!\d|\.\d)", text) is not None


# ------------------------------------------------------------------------------ correctness


@pytest.mark.parametrize("key", sorted(CALCULATORS))
def test_answers_match_independent_formulas(key):
    for row in rows_of(key):
        entities = json.loads(row["Relevant Entities"])
        expected = reference(key, entities)
        answer = row["Ground Truth Answer"]
        output_type = row["Output Type"]
        if output_type == "date":
            assert answer == expected.strftime("%m/%d/%Y"), row
        elif output_type == "integer":
            assert re.fullmatch(r"\d+", answer), answer
            assert int(answer) == expected, row
        else:
            # At most 3 decimals, no trailing zeros, and equal to the formula after rounding.
            assert re.fullmatch(r"-?\d+(\.\d{0,2}[1-9])?", answer), answer
            assert abs(float(answer) - expected) <= 0.0005 + 1e-9, (answer, expected, row)


@pytest.mark.parametrize("key", sorted(CALCULATORS))
def test_key_inputs_appear_in_note(key):
    for row in rows_of(key):
        entities = json.loads(row["Relevant Entities"])
        note = row["Patient Note"]
        for value in key_numbers(key, entities):
            assert contains_number(note, value), (value, note)
        if key == "due_date":
            lmp = datetime.strptime(entities["Last menstrual date"], "%m/%d/%Y").date()
            long_form = f"{lmp.strftime('%B')} {lmp.day}, {lmp.year}"
            assert entities["Last menstrual date"] in note or long_form in note, note


# Each score component must be stated or explicitly denied in every note.
COMPONENT_WORDS = {
    "cha2ds2_vasc": [
        ("heart failure",), ("hypertension", "high blood pressure"), ("diabetes",), ("stroke",),
        ("transient ischemic attack", "TIA"), ("thromboembol", "embolism"),
        ("vascular disease", "myocardial infarction", "artery disease", "aortic plaque"),
    ],
    "curb_65": [("confus", "oriented")],
    "wells_pe": [
        ("calf", "leg", "deep vein thrombosis"), ("pulmonary embolism",),
        ("bedridden", "immobilized", "confined to bed", "ambulatory", "bed rest"),
        ("surgery", "underwent", "operation"), ("hemoptysis", "coughing up blood"),
        ("cancer", "malignancy", "lymphoma"),
    ],
}


@pytest.mark.parametrize("key", sorted(COMPONENT_WORDS))
def test_score_components_are_stated_or_denied(key):
    for row in rows_of(key):
        note = row["Patient Note"].lower()
        for words in COMPONENT_WORDS[key]:
            assert any(word.lower() in note for word in words), (words, row["Patient Note"])


def test_curb65_confusion_wording_matches_input():
    for row in rows_of("curb_65", 100):
        note = row["Patient Note"].lower()
        confused = json.loads(row["Relevant Entities"])["Confusion"]
        phrases = ("was confused", "newly confused", "new-onset confusion", "disoriented")
        says_confused = any(phrase in note for phrase in phrases)
        assert says_confused == confused, row["Patient Note"]


def test_explanation_ends_with_the_answer():
    for row in generate_rows(200, seed=5):
        lines = row["Ground Truth Explanation"].strip().splitlines()
        assert len(lines) >= 3
        answer = re.escape(row["Ground Truth Answer"])
        assert re.search(rf"(?<![\d.]){answer}(?!\d)", lines[-1]), lines[-1]


def test_explanations_show_the_inputs():
    for row in generate_rows(200, seed=6):
        key = row["Note ID"].split("-")[1]
        entities = json.loads(row["Relevant Entities"])
        for value in key_numbers(key, entities):
            explanation = row["Ground Truth Explanation"]
            assert contains_number(explanation, value), (value, explanation)


# ---------------------------------------------------------------------------------- limits


def test_limits_bracket_the_answer():
    for row in generate_rows(300, seed=9):
        answer, lower, upper = row["Ground Truth Answer"], row["Lower Limit"], row["Upper Limit"]
        if row["Output Type"] == "decimal" and not row["Calculator Name"].startswith("Wells"):
            a, lo, hi = float(answer), float(lower), float(upper)
            assert lo <= a <= hi
            assert lo == pytest.approx(min(a * 0.95, a * 1.05), abs=1e-6)
            assert hi == pytest.approx(max(a * 0.95, a * 1.05), abs=1e-6)
            assert len(lower.partition(".")[2]) <= 6 and len(upper.partition(".")[2]) <= 6
        else:
            assert lower == upper == answer, row


def test_negative_decimal_limits_are_ordered():
    calc = CALCULATORS["anion_gap"]
    assert calc.limits("-10") == ("-10.5", "-9.5")
    assert calc.limits("0") == ("0", "0")
    assert CALCULATORS["wells_pe"].limits("4.5") == ("4.5", "4.5")


# ------------------------------------------------------------------ determinism and schema


def test_same_seed_same_rows_different_seed_different_rows():
    a = generate_rows(40, seed=7)
    assert a == generate_rows(40, seed=7)
    b = generate_rows(40, seed=8)
    assert a != b
    assert sum(x["Patient Note"] != y["Patient Note"] for x, y in zip(a, b)) > 30


def test_global_random_state_is_neither_used_nor_changed():
    random.seed(1)
    state = random.getstate()
    a = generate_rows(30, seed=3)
    assert random.getstate() == state
    random.seed(2)
    assert generate_rows(30, seed=3) == a


def test_shorter_run_is_a_prefix_of_a_longer_one():
    assert generate_rows(13, seed=4) == generate_rows(40, seed=4)[:13]


def test_every_calculator_appears_and_schema_is_complete():
    n = len(CALCULATORS) * 2
    rows = generate_rows(n, seed=0)
    assert len(rows) == n
    names = [row["Calculator Name"] for row in rows]
    assert set(names) == {calc.name for calc in CALCULATORS.values()}
    assert all(names.count(name) == 2 for name in set(names))
    one_each = generate_rows(len(CALCULATORS), seed=11)
    assert {row["Calculator Name"] for row in one_each} == set(names)
    for index, row in enumerate(rows):
        assert set(row) == set(SCHEMA)
        for column in SCHEMA:
            assert isinstance(row[column], str) and row[column].strip(), (column, row)
        assert row["Output Type"] in {"decimal", "integer", "date"}
        assert row["Category"] in CATEGORIES
        assert row["Note Type"] == "Synthetic"
        assert row["Row Number"] == str(index + 1)
        assert re.fullmatch(rf"synth-[a-z0-9_]+-{index}", row["Note ID"]), row["Note ID"]
        assert isinstance(json.loads(row["Relevant Entities"]), dict)
        assert row["Calculator ID"].isdigit()
    assert len({row["Note ID"] for row in rows}) == n


def test_registry_entries_are_consistent():
    assert len(CALCULATORS) >= 10
    assert len({c.name for c in CALCULATORS.values()}) == len(CALCULATORS)
    assert len({c.calculator_id for c in CALCULATORS.values()}) == len(CALCULATORS)
    for key, calc in CALCULATORS.items():
        assert calc.key == key
        assert calc.output_type in {"decimal", "integer", "date"}
        assert calc.category in CATEGORIES
        assert calc.question.strip().endswith(("?", ".", " "))
        inputs = calc.sample(random.Random(0))
        assert json.loads(json.dumps(inputs)) == inputs
    assert CALCULATORS["due_date"].output_type == "date"
    assert CALCULATORS["cha2ds2_vasc"].output_type == "integer"
    assert CALCULATORS["wells_pe"].output_type == "decimal"
    assert "actual body weight" in CALCULATORS["crcl"].question


def test_calculator_selection_and_bad_arguments():
    rows = generate_rows(7, seed=1, calculators=["bmi", "due_date"])
    assert {r["Calculator Name"] for r in rows} == {"Body Mass Index (BMI)", "Estimated Due Date"}
    assert generate_rows(0) == []
    with pytest.raises(ValueError, match="unknown calculator"):
        generate_rows(3, calculators=["nope"])
    with pytest.raises(ValueError):
        generate_rows(3, calculators=[])
    with pytest.raises(ValueError):
        generate_rows(-1)


# --------------------------------------------------------------------------------- variety


@pytest.mark.parametrize("key", sorted(CALCULATORS))
def test_notes_are_varied(key):
    notes = [row["Patient Note"] for row in rows_of(key, 100, seed=21)]
    assert len(set(notes)) >= 95
    # Variety in wording, not only in numbers: compare notes with the digits masked.
    skeletons = {re.sub(r"\d+(\.\d+)?", "#", note) for note in notes}
    assert len(skeletons) >= 50, key


def test_notes_use_the_right_indefinite_articles():
    for row in generate_rows(400, seed=13):
        note = row["Patient Note"]
        assert not re.search(r"\b[Aa] (8\d*|11|18)[- ]year", note), note
        assert not re.search(r"\b[Aa]n (?!8|11[- ]|18[- ])\d+[- ]year", note), note
        assert not re.search(r"\b[Aa] [aeioAEIO]", note), note  # "a urinary" is fine


def test_notes_use_both_sexes_and_varied_units():
    rows = rows_of("crcl", 100, seed=2)
    sexes = {json.loads(r["Relevant Entities"])["sex"] for r in rows}
    assert sexes == {"Male", "Female"}
    for row in rows:
        sex = json.loads(row["Relevant Entities"])["sex"]
        words = set(re.findall(r"[a-z]+", row["Patient Note"].lower()))
        nouns = {"man", "male", "gentleman"} if sex == "Male" else {"woman", "female", "lady"}
        assert nouns & words, row["Patient Note"]
        other = {"she", "her"} if sex == "Male" else {"he", "his", "him"}
        assert not other & words, row["Patient Note"]
    units = {json.loads(r["Relevant Entities"])["height"][1] for r in rows_of("bmi", 100, seed=2)}
    assert units == {"cm", "m", "in"}


# ------------------------------------------------------------------------ textbook values


def test_textbook_values_physical_and_lab():
    fmt = synth.format_decimal
    assert fmt(synth.bmi({"weight": [70, "kg"], "height": [175, "cm"]})) == "22.857"
    assert fmt(synth.bmi({"weight": [70, "kg"], "height": [1.75, "m"]})) == "22.857"
    bp = {"Systolic Blood Pressure": [120, "mm Hg"], "Diastolic Blood Pressure": [80, "mm Hg"]}
    assert fmt(synth.mean_arterial_pressure(bp)) == "93.333"
    male = {"sex": "Male", "age": [60, "years"], "weight": [72, "kg"],
            "creatinine": [1.0, "mg/dL"]}
    assert synth.creatinine_clearance(male) == pytest.approx(80.0)
    assert synth.creatinine_clearance({**male, "sex": "Female"}) == pytest.approx(68.0)
    electrolytes = {"Sodium": [140, "mEq/L"], "Chloride": [104, "mEq/L"],
                    "Bicarbonate": [24, "mEq/L"]}
    assert synth.anion_gap(electrolytes) == pytest.approx(12)
    calcium = {"Calcium": [8.0, "mg/dL"], "Albumin": [2.0, "g/dL"]}
    assert synth.corrected_calcium(calcium) == pytest.approx(9.6)
    ecg = {"Heart Rate or Pulse": [60, "beats per minute"], "QT interval": [400, "msec"]}
    assert synth.qtc_bazett(ecg) == pytest.approx(400)
    ecg = {"Heart Rate or Pulse": [100, "beats per minute"], "QT interval": [350, "msec"]}
    assert fmt(synth.qtc_bazett(ecg)) == "451.848"


def test_textbook_values_cha2ds2_vasc():
    none = {"Congestive Heart Failure": False, "Hypertension history": False,
            "Diabetes history": False, "Stroke": False,
            "Transient Ischemic Attacks History": False, "Thromboembolism history": False,
            "Vascular disease history": False}
    woman_76_with_htn = {**none, "sex": "Female", "age": [76, "years"],
                         "Hypertension history": True}
    assert synth.cha2ds2_vasc(woman_76_with_htn) == 4
    assert synth.cha2ds2_vasc({**none, "sex": "Male", "age": [50, "years"]}) == 0
    # Stroke and TIA together still count 2 points once.
    man_70 = {**none, "sex": "Male", "age": [70, "years"], "Stroke": True,
              "Transient Ischemic Attacks History": True}
    assert synth.cha2ds2_vasc(man_70) == 3


def test_textbook_values_curb_65():
    sick = {"age": [70, "years"], "Confusion": True, "Blood Urea Nitrogen (BUN)": [25, "mg/dL"],
            "respiratory rate": [32, "breaths per minute"],
            "Systolic Blood Pressure": [85, "mm Hg"], "Diastolic Blood Pressure": [50, "mm Hg"]}
    assert synth.curb_65(sick) == 5
    # Every criterion just on the healthy side of its threshold.
    borderline = {"age": [64, "years"], "Confusion": False,
                  "Blood Urea Nitrogen (BUN)": [19, "mg/dL"],
                  "respiratory rate": [29, "breaths per minute"],
                  "Systolic Blood Pressure": [90, "mm Hg"],
                  "Diastolic Blood Pressure": [61, "mm Hg"]}
    assert synth.curb_65(borderline) == 0


def test_textbook_values_wells_pe():
    wells = {"Heart Rate or Pulse": [110, "beats per minute"],
             "Clinical signs and symptoms of DVT": True,
             "Pulmonary Embolism is #1 diagnosis OR equally likely": True,
             "Immobilization for at least 3 days": False,
             "Surgery in the previous 4 weeks": False,
             "Previously Documented Pulmonary Embolism": False,
             "Previously documented Deep Vein Thrombosis": False,
             "Hemoptysis": False,
             "Malignancy with treatment within 6 months or palliative": False}
    assert synth.wells_pe(wells) == 7.5
    slower = {**wells, "Heart Rate or Pulse": [100, "beats per minute"], "Hemoptysis": True,
              "Surgery in the previous 4 weeks": True}
    assert synth.wells_pe(slower) == 8.5


def test_textbook_values_due_date():
    def due(lmp: str, cycle: int) -> date:
        return synth.due_date({"Last menstrual date": lmp, "cycle length": cycle})

    assert due("01/01/2020", 28) == date(2020, 10, 7)
    assert due("01/01/2020", 32) == date(2020, 10, 11)
    assert due("01/01/2020", 21) == date(2020, 9, 30)
    assert CALCULATORS["due_date"].format_answer(date(2020, 10, 7)) == "10/07/2020"


def test_unit_conversions():
    imperial = {"weight": [154.3, "lb"], "height": [69, "in"]}
    assert synth.bmi(imperial) == pytest.approx(154.3 * 0.45359237 / (69 * 0.0254) ** 2)
    cr_umol = {"sex": "Male", "age": [40, "years"], "weight": [70, "kg"],
               "creatinine": [88.4, "µmol/L"]}
    assert synth.creatinine_clearance(cr_umol) == pytest.approx(100 * 70 / 72)
    si_units = {"Calcium": [2.0, "mmol/L"], "Albumin": [30, "g/L"]}
    assert synth.corrected_calcium(si_units) == pytest.approx(8.816)


def test_format_decimal():
    assert synth.format_decimal(25.2380) == "25.238"
    assert synth.format_decimal(100.0) == "100"
    assert synth.format_decimal(9.3200001) == "9.32"
    assert synth.format_decimal(-0.0001) == "0"


# ------------------------------------------------------------------ the task reads the rows


def test_medcalc_task_reads_and_scores_synthetic_rows():
    from talr.tasks.medcalc import MedCalc

    task = MedCalc(source="synthetic", num_synthetic=40, seed=3)
    rows = task.read()
    assert len(rows) == 40
    for row in rows:
        truth = json.dumps({"answer": row["Ground Truth Answer"]})
        assert task.score(f"...</think>\n<answer>\n{truth}\n</answer>", row).correct, row
