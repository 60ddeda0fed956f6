"""Synthetic MedCalc-Bench-style rows: the embedded default domain dataset.

A deterministic generator (no network, no downloaded data) of rows with the MedCalc-Bench
column schema, for ten calculators with standard public formulas. Each row has a synthetic
patient note in varied wording (templates, shuffled findings, distractor findings, varied
units), a benchmark-style question, a step-by-step explanation, the ground-truth answer and
its acceptance limits.

    rows = generate_rows(256, seed=0)                       # cycles over all calculators
    rows = generate_rows(50, seed=1, calculators=["bmi"])   # one calculator

`CALCULATORS` maps a short key to a `Calculator`. The inputs of a row are its `Relevant
Entities` (a JSON object): numbers are `[value, unit]` pairs in the unit the note uses,
findings of scores are booleans, and the due-date inputs are a date string and an integer.
The formulas (`bmi`, `mean_arterial_pressure`, ...) are module-level functions of that
object, so they can be called directly.

Only the standard library is used; all randomness comes from a local `random.Random(seed)`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "CALCULATORS",
    "COLUMNS",
    "Calculator",
    "anion_gap",
    "bmi",
    "cha2ds2_vasc",
    "corrected_calcium",
    "creatinine_clearance",
    "curb_65",
    "due_date",
    "format_decimal",
    "generate_rows",
    "mean_arterial_pressure",
    "qtc_bazett",
    "wells_pe",
]

COLUMNS = (
    "Row Number",
    "Calculator ID",
    "Calculator Name",
    "Category",
    "Output Type",
    "Note ID",
    "Note Type",
    "Patient Note",
    "Question",
    "Relevant Entities",
    "Ground Truth Answer",
    "Lower Limit",
    "Upper Limit",
    "Ground Truth Explanation",
)

Inputs = dict[str, Any]

# Unit conversions (exact definitions or standard clinical factors).
LB_TO_KG = 0.45359237
IN_TO_CM = 2.54
CREATININE_UMOL_PER_MG_DL = 88.4  # µmol/L per mg/dL (molar mass 113.12 g/mol)
CALCIUM_MG_DL_PER_MMOL_L = 4.008  # mg/dL per mmol/L (molar mass 40.08 g/mol)
DATE_FORMAT = "%m/%d/%Y"

# ===================================================================== number formatting


def format_decimal(value: float, places: int = 3) -> str:
    """`value` rounded to `places` decimals without trailing zeros: 25.2380 -> '25.238'."""
    text = f"{value:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _num(value: float | int) -> str:
    """An input number as the note shows it: 72.0 -> '72', 1.40 -> '1.4'."""
    value = float(value)
    if value.is_integer():
        return str(int(value))
    return repr(round(value, 6))


def _fmt(value: float, places: int = 3) -> str:
    """An intermediate result in an explanation."""
    return format_decimal(value, places)


# ===================================================================== unit helpers


def _weight_kg(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "kg":
        return value
    if unit == "lb":
        return value * LB_TO_KG
    raise ValueError(f"unknown weight unit {unit!r}")


def _height_m(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "cm":
        return value / 100
    if unit == "m":
        return value
    if unit == "in":
        return value * IN_TO_CM / 100
    raise ValueError(f"unknown height unit {unit!r}")


def _creatinine_mg_dl(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "mg/dL":
        return value
    if unit == "µmol/L":
        return value / CREATININE_UMOL_PER_MG_DL
    raise ValueError(f"unknown creatinine unit {unit!r}")


def _calcium_mg_dl(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "mg/dL":
        return value
    if unit == "mmol/L":
        return value * CALCIUM_MG_DL_PER_MMOL_L
    raise ValueError(f"unknown calcium unit {unit!r}")


def _albumin_g_dl(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "g/dL":
        return value
    if unit == "g/L":
        return value / 10
    raise ValueError(f"unknown albumin unit {unit!r}")


# ===================================================================== formulas

# Entity keys shared by several calculators.
SEX, AGE, WEIGHT, HEIGHT = "sex", "age", "weight", "height"
SBP, DBP = "Systolic Blood Pressure", "Diastolic Blood Pressure"
HEART_RATE = "Heart Rate or Pulse"
CREATININE = "creatinine"
SODIUM, CHLORIDE, BICARBONATE = "Sodium", "Chloride", "Bicarbonate"
CALCIUM, ALBUMIN = "Calcium", "Albumin"
QT = "QT interval"
CHF, HTN, DM = "Congestive Heart Failure", "Hypertension history", "Diabetes history"
STROKE, TIA, THROMBO = "Stroke", "Transient Ischemic Attacks History", "Thromboembolism history"
VASCULAR = "Vascular disease history"
CONFUSION, BUN, RESP_RATE = "Confusion", "Blood Urea Nitrogen (BUN)", "respiratory rate"
DVT_SIGNS = "Clinical signs and symptoms of DVT"
PE_LIKELY = "Pulmonary Embolism is #1 diagnosis OR equally likely"
IMMOBILIZED = "Immobilization for at least 3 days"
SURGERY = "Surgery in the previous 4 weeks"
PRIOR_PE = "Previously Documented Pulmonary Embolism"
PRIOR_DVT = "Previously documented Deep Vein Thrombosis"
HEMOPTYSIS = "Hemoptysis"
MALIGNANCY = "Malignancy with treatment within 6 months or palliative"
LMP, CYCLE = "Last menstrual date", "cycle length"


def bmi(inputs: Mapping[str, Any]) -> float:
    """Body mass index in kg/m²: weight / height²."""
    return _weight_kg(inputs[WEIGHT]) / _height_m(inputs[HEIGHT]) ** 2


def mean_arterial_pressure(inputs: Mapping[str, Any]) -> float:
    """MAP in mm Hg: (2 × diastolic + systolic) / 3."""
    return (2 * float(inputs[DBP][0]) + float(inputs[SBP][0])) / 3


def creatinine_clearance(inputs: Mapping[str, Any]) -> float:
    """Cockcroft-Gault creatinine clearance in mL/min, with actual body weight.

    (140 − age) × weight kg × (0.85 if female) / (72 × serum creatinine mg/dL).
    """
    sex_factor = 0.85 if inputs[SEX] == "Female" else 1.0
    age = float(inputs[AGE][0])
    return (140 - age) * _weight_kg(inputs[WEIGHT]) * sex_factor / (
        72 * _creatinine_mg_dl(inputs[CREATININE])
    )


def anion_gap(inputs: Mapping[str, Any]) -> float:
    """Anion gap in mEq/L: Na − (Cl + HCO3)."""
    return float(inputs[SODIUM][0]) - (float(inputs[CHLORIDE][0]) + float(inputs[BICARBONATE][0]))


def corrected_calcium(inputs: Mapping[str, Any]) -> float:
    """Calcium corrected for albumin in mg/dL: Ca + 0.8 × (4 − albumin g/dL)."""
    return _calcium_mg_dl(inputs[CALCIUM]) + 0.8 * (4.0 - _albumin_g_dl(inputs[ALBUMIN]))


def qtc_bazett(inputs: Mapping[str, Any]) -> float:
    """Bazett's corrected QT in msec: QT / √(RR in seconds), RR = 60 / heart rate."""
    return float(inputs[QT][0]) / math.sqrt(60.0 / float(inputs[HEART_RATE][0]))


def cha2ds2_vasc(inputs: Mapping[str, Any]) -> int:
    """CHA2DS2-VASc stroke risk score for atrial fibrillation (0-9)."""
    age = float(inputs[AGE][0])
    score = 2 if age >= 75 else 1 if age >= 65 else 0
    score += inputs[SEX] == "Female"
    score += bool(inputs[CHF]) + bool(inputs[HTN]) + bool(inputs[DM]) + bool(inputs[VASCULAR])
    score += 2 * bool(inputs[STROKE] or inputs[TIA] or inputs[THROMBO])
    return int(score)


def curb_65(inputs: Mapping[str, Any]) -> int:
    """CURB-65 pneumonia severity score (0-5)."""
    score = bool(inputs[CONFUSION])
    score += float(inputs[BUN][0]) > 19
    score += float(inputs[RESP_RATE][0]) >= 30
    score += float(inputs[SBP][0]) < 90 or float(inputs[DBP][0]) <= 60
    score += float(inputs[AGE][0]) >= 65
    return int(score)


def wells_pe(inputs: Mapping[str, Any]) -> float:
    """Wells' criteria for pulmonary embolism (0-12.5, in half points)."""
    score = 3.0 * bool(inputs[DVT_SIGNS]) + 3.0 * bool(inputs[PE_LIKELY])
    score += 1.5 * (float(inputs[HEART_RATE][0]) > 100)
    score += 1.5 * bool(inputs[IMMOBILIZED] or inputs[SURGERY])
    score += 1.5 * bool(inputs[PRIOR_PE] or inputs[PRIOR_DVT])
    score += 1.0 * bool(inputs[HEMOPTYSIS]) + 1.0 * bool(inputs[MALIGNANCY])
    return score


def due_date(inputs: Mapping[str, Any]) -> date:
    """Naegele's rule with cycle length: LMP + 280 days + (cycle length − 28) days."""
    lmp = _parse_date(inputs[LMP])
    return lmp + timedelta(days=280 + int(inputs[CYCLE]) - 28)


def _parse_date(text: str) -> date:
    month, day, year = (int(part) for part in text.split("/"))
    return date(year, month, day)


# ===================================================================== note building blocks


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: Sequence[str], conj: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} {conj} {items[1]}"
    return f"{', '.join(items[:-1])}, {conj} {items[-1]}"


@dataclass(frozen=True)
class _Person:
    age: int
    sex: str  # "Male" or "Female"

    @property
    def female(self) -> bool:
        return self.sex == "Female"

    @property
    def he(self) -> str:
        return "she" if self.female else "he"

    @property
    def his(self) -> str:
        return "her" if self.female else "his"

    @property
    def him(self) -> str:
        return "her" if self.female else "him"

    def noun(self, rng: random.Random) -> str:
        return rng.choice(["woman", "female", "woman", "lady"] if self.female
                          else ["man", "male", "man", "gentleman"])


def _random_sex(rng: random.Random) -> str:
    return rng.choice(["Male", "Female"])


def _person(inputs: Mapping[str, Any], rng: random.Random,
            ages: tuple[int, int] = (19, 88)) -> _Person:
    """The patient of a note: age and sex from the inputs when they are inputs, else random."""
    age = int(inputs[AGE][0]) if AGE in inputs else rng.randint(*ages)
    sex = inputs[SEX] if SEX in inputs else _random_sex(rng)
    return _Person(age, sex)


_INTRO_TEMPLATES = (
    "{A} {age}-year-old {noun} presented to {setting} with {complaint}.",
    "{A} {age}-year-old {noun} was evaluated at {setting} for {complaint}.",
    "We describe {a} {age}-year-old {noun} who came to {setting} because of {complaint}.",
    "The patient is {a} {age}-year-old {noun} seen at {setting} with {complaint}.",
    "{A} {age} year old {noun} was brought to {setting} with {complaint}.",
    "A {noun} aged {age} years presented to {setting} complaining of {complaint}.",
    "{Setting} evaluated {a} {age}-year-old {noun} for {complaint}.",
)
_SETTINGS = (
    "the emergency department",
    "our hospital",
    "the outpatient clinic",
    "an urgent care center",
    "the medical admissions unit",
)


def _indefinite(phrase: str) -> str:
    """'a' or 'an' before a phrase (abbreviations read letter by letter count as spoken)."""
    vowel_sound = phrase[:1].lower() in "aeiou" or phrase.split()[0] in {"SpO2", "Na", "HCO3-"}
    return "an" if vowel_sound else "a"


def _article(number: int) -> str:
    """The indefinite article before a spoken number: 'an 18-year-old', 'a 67-year-old'."""
    return "an" if str(number).startswith("8") or number in (11, 18) else "a"


def _intro(rng: random.Random, person: _Person, complaints: Sequence[str],
           settings: Sequence[str] = _SETTINGS) -> str:
    setting = rng.choice(settings)
    article = _article(person.age)
    return rng.choice(_INTRO_TEMPLATES).format(
        a=article, A=_cap(article), age=person.age, noun=person.noun(rng),
        setting=setting, Setting=_cap(setting),
        complaint=rng.choice(complaints),
    )


@dataclass(frozen=True)
class _Measure:
    """One measured finding: its group (vitals, labs, body, ecg), label and value text."""

    group: str
    label: str
    value: str


_LIST_COLON = {
    "vitals": ("Vital signs", "Vitals on arrival", "Initial vital signs", "On admission, vitals"),
    "labs": ("Laboratory results", "Admission labs", "Laboratory values", "Blood tests"),
    "body": ("Anthropometry", "Measurements", "Body measurements"),
    "ecg": ("ECG", "Electrocardiogram", "12-lead ECG"),
}
_LIST_VERB = {
    "vitals": ("Vital signs were notable for", "On arrival, vital signs showed",
               "Examination revealed", "Her vital signs included"),
    "labs": ("Laboratory studies revealed", "Initial blood work showed",
             "Labs were significant for", "Blood tests showed"),
    "body": ("Examination recorded a", "Measurements included"),
    "ecg": ("An electrocardiogram showed", "The ECG demonstrated", "A 12-lead ECG revealed"),
}


def _render_measures(rng: random.Random, person: _Person,
                     measures: Sequence[_Measure]) -> list[str]:
    """Sentences for the measured findings: per group either one list or one sentence each."""
    groups: dict[str, list[_Measure]] = {}
    for measure in measures:
        groups.setdefault(measure.group, []).append(measure)
    sentences = []
    for group, items in groups.items():
        items = list(items)
        rng.shuffle(items)
        style = rng.random()
        if len(items) >= 2 and style < 0.4:
            head = rng.choice(_LIST_COLON[group])
            sep = rng.choice([", ", "; "])
            body = sep.join(f"{m.label} {m.value}" for m in items)
            sentences.append(f"{head}: {body}.")
        elif len(items) >= 2 and style < 0.7:
            head = rng.choice(_LIST_VERB[group]).replace("Her ", _cap(person.his) + " ")
            sentences.append(f"{head} {_join([f'{m.label} of {m.value}' for m in items])}.")
        else:
            for m in items:
                sentences.append(rng.choice([
                    f"{_cap(person.his)} {m.label} was {m.value}.",
                    f"{_cap(m.label)} was {m.value}.",
                    f"{_cap(m.label)} measured {m.value}.",
                    f"{_cap(_indefinite(m.label))} {m.label} of {m.value} was recorded.",
                ]))
    return sentences


# Unit wordings.
_MMHG = ("mmHg", "mm Hg")
_BPM = ("beats per minute", "bpm", "beats/min")
_BREATHS = ("breaths per minute", "breaths/min", "/min")


def _val(rng: random.Random, number: float | int, units: Sequence[str]) -> str:
    unit = rng.choice(units)
    return f"{_num(number)}{unit}" if unit.startswith("/") else f"{_num(number)} {unit}"


def _bp_text(rng: random.Random, sbp: int, dbp: int) -> str:
    return rng.choice([f"{sbp}/{dbp} {rng.choice(_MMHG)}", f"{sbp}/{dbp}",
                       f"{sbp} over {dbp} {rng.choice(_MMHG)}"])


# Distractors: tag -> function(rng) giving a measured finding that no formula here uses.
def _d_temp(rng: random.Random) -> _Measure:
    celsius = round(rng.uniform(36.0, 39.6), 1)
    if rng.random() < 0.3:
        return _Measure("vitals", "temperature", f"{_num(round(celsius * 9 / 5 + 32, 1))} °F")
    return _Measure("vitals", rng.choice(["temperature", "body temperature"]),
                    f"{_num(celsius)} {rng.choice(['°C', 'degrees Celsius'])}")


def _d_hr(rng: random.Random) -> _Measure:
    return _Measure("vitals", rng.choice(["heart rate", "pulse"]),
                    _val(rng, rng.randint(58, 118), _BPM))


def _d_rr(rng: random.Random) -> _Measure:
    return _Measure("vitals", "respiratory rate", _val(rng, rng.randint(12, 26), _BREATHS))


def _d_bp(rng: random.Random) -> _Measure:
    sbp = rng.randint(100, 165)
    dbp = rng.randint(55, min(sbp - 25, 100))
    return _Measure("vitals", "blood pressure", _bp_text(rng, sbp, dbp))


def _d_spo2(rng: random.Random) -> _Measure:
    return _Measure("vitals", rng.choice(["oxygen saturation", "SpO2"]),
                    f"{rng.randint(88, 100)}% on "
                    f"{rng.choice(['room air', 'ambient air', '2 L nasal cannula'])}")


def _d_hgb(rng: random.Random) -> _Measure:
    return _Measure("labs", "hemoglobin", f"{_num(round(rng.uniform(8.5, 16.5), 1))} g/dL")


def _d_wbc(rng: random.Random) -> _Measure:
    return _Measure("labs", rng.choice(["white blood cell count", "WBC count", "leukocyte count"]),
                    f"{_num(round(rng.uniform(3.5, 19.0), 1))} × 10^9/L")


def _d_plt(rng: random.Random) -> _Measure:
    return _Measure("labs", "platelet count", f"{rng.randint(110, 420)} × 10^9/L")


def _d_glucose(rng: random.Random) -> _Measure:
    return _Measure("labs", rng.choice(["glucose", "serum glucose", "blood glucose"]),
                    f"{rng.randint(72, 160)} mg/dL")


def _d_potassium(rng: random.Random) -> _Measure:
    return _Measure("labs", rng.choice(["potassium", "serum potassium"]),
                    f"{_num(round(rng.uniform(3.2, 5.4), 1))} {rng.choice(['mmol/L', 'mEq/L'])}")


def _d_sodium(rng: random.Random) -> _Measure:
    return _Measure("labs", "sodium", f"{rng.randint(132, 146)} {rng.choice(['mmol/L', 'mEq/L'])}")


def _d_bun(rng: random.Random) -> _Measure:
    return _Measure("labs", rng.choice(["BUN", "blood urea nitrogen"]),
                    f"{rng.randint(8, 30)} mg/dL")


def _d_creatinine(rng: random.Random) -> _Measure:
    return _Measure("labs", "creatinine", f"{_num(round(rng.uniform(0.6, 1.6), 2))} mg/dL")


def _d_albumin(rng: random.Random) -> _Measure:
    return _Measure("labs", "albumin", f"{_num(round(rng.uniform(2.8, 4.8), 1))} g/dL")


def _d_ast(rng: random.Random) -> _Measure:
    return _Measure("labs", rng.choice(["AST", "aspartate aminotransferase"]),
                    f"{rng.randint(14, 90)} U/L")


def _d_lactate(rng: random.Random) -> _Measure:
    return _Measure("labs", "lactate", f"{_num(round(rng.uniform(0.6, 3.8), 1))} mmol/L")


def _d_height(rng: random.Random) -> _Measure:
    return _Measure("body", "height", f"{rng.randint(150, 192)} cm")


def _d_weight(rng: random.Random) -> _Measure:
    return _Measure("body", "weight", f"{_num(round(rng.uniform(48, 110), 1))} kg")


_DISTRACTORS: dict[str, Callable[[random.Random], _Measure]] = {
    "temp": _d_temp, "hr": _d_hr, "rr": _d_rr, "bp": _d_bp, "spo2": _d_spo2,
    "hgb": _d_hgb, "wbc": _d_wbc, "plt": _d_plt, "glucose": _d_glucose, "k": _d_potassium,
    "na": _d_sodium, "bun": _d_bun, "cr": _d_creatinine, "alb": _d_albumin, "ast": _d_ast,
    "lactate": _d_lactate, "height": _d_height, "weight": _d_weight,
}

_SOCIAL = (
    "{He} is a retired teacher and lives with {his} spouse.",
    "{He} drinks alcohol occasionally and does not use illicit drugs.",
    "{He} is a former smoker with a 20 pack-year history.",
    "{He} has never smoked.",
    "{He} reports no known drug allergies.",
    "{His} home medications include a daily multivitamin.",
    "{He} works as an accountant and exercises twice a week.",
    "Family history is notable for coronary artery disease in {his} father.",
    "{He} lives alone and is independent in daily activities.",
)
_OTHER_HISTORY = (
    "hyperlipidemia", "hypothyroidism", "gastroesophageal reflux disease", "osteoarthritis",
    "depression", "gout", "benign prostatic hyperplasia", "migraine", "glaucoma", "asthma",
)
_CLOSINGS = (
    "{He} was admitted for further management.",
    "Further workup was initiated.",
    "{He} was monitored closely while awaiting further results.",
    "Treatment was started and {he} was observed overnight.",
)


def _fill(template: str, person: _Person) -> str:
    return template.format(he=person.he, his=person.his, him=person.him,
                           He=_cap(person.he), His=_cap(person.his), Him=_cap(person.him))


def _distractors(rng: random.Random, exclude: set[str], low: int = 1,
                 high: int = 4) -> list[_Measure]:
    """Between `low` and `high` unrelated findings, none of the excluded kinds."""
    tags = [tag for tag in _DISTRACTORS if tag not in exclude]
    chosen = rng.sample(tags, rng.randint(low, high))
    return [_DISTRACTORS[tag](rng) for tag in chosen]


def _compose(rng: random.Random, person: _Person, intro: str, measures: Sequence[_Measure],
             sentences: Sequence[str] = (), social: bool = True, closing: bool = True) -> str:
    """The note: the intro first, then shuffled findings, then optionally a closing line."""
    body = _render_measures(rng, person, measures) + list(sentences)
    if social and rng.random() < 0.5:
        body.append(_fill(rng.choice(_SOCIAL), person))
    rng.shuffle(body)
    parts = [intro, *body]
    if closing and rng.random() < 0.4:
        parts.append(_fill(rng.choice(_CLOSINGS), person))
    return " ".join(parts)


def _history_sentences(rng: random.Random, person: _Person, present: Sequence[str],
                       absent: Sequence[str]) -> list[str]:
    """Sentences stating the present conditions and explicitly denying the absent ones."""
    present, absent = list(present), list(absent)
    rng.shuffle(present)
    rng.shuffle(absent)
    out = []
    if present:
        out.append(rng.choice([
            f"{_cap(person.his)} past medical history is significant for {_join(present)}.",
            f"{_cap(person.he)} has a history of {_join(present)}.",
            f"Medical history includes {_join(present)}.",
            f"Past medical history: {_join(present)}.",
        ]))
    # Denials: one sentence, or two when there are several.
    chunks = [absent] if len(absent) < 3 or rng.random() < 0.5 else [absent[:2], absent[2:]]
    for chunk in chunks:
        if not chunk:
            continue
        out.append(rng.choice([
            f"{_cap(person.he)} has no history of {_join(chunk, 'or')}.",
            f"{_cap(person.he)} denies any history of {_join(chunk, 'or')}.",
            f"There is no known history of {_join(chunk, 'or')}.",
            f"{_cap(person.his)} history is negative for {_join(chunk, 'or')}.",
        ]))
    return out


# ===================================================================== explanations helpers


def _weight_lines(entity: Sequence[Any]) -> tuple[str, float]:
    kg = _weight_kg(entity)
    if entity[1] == "lb":
        line = (f"The patient's weight is {_num(entity[0])} lb, which is {_num(entity[0])} lb * "
                f"{LB_TO_KG} kg/lb = {_fmt(kg)} kg.")
    else:
        line = f"The patient's weight is {_num(entity[0])} kg."
    return line, kg


def _answer_sentence(what: str, answer: str, unit: str = "") -> str:
    return f"Hence, the patient's {what} is {answer}{' ' + unit if unit else ''}."


def _running(total: float, points: float, integer: bool = True) -> tuple[float, str]:
    """The new running total and its sentence part."""
    show = (lambda x: str(int(x))) if integer else (lambda x: format_decimal(x, 1))
    new = total + points
    if points:
        return new, f"making the current total {show(total)} + {show(points)} = {show(new)}"
    return new, f"keeping the current total at {show(total)}"


# ===================================================================== calculators

# ----------------------------------------------------------------- 1. BMI


def _sample_bmi(rng: random.Random) -> Inputs:
    height_cm = rng.uniform(148, 196)
    target = rng.uniform(16.5, 42.0)
    weight_kg = target * (height_cm / 100) ** 2
    height_unit = rng.choices(["cm", "m", "in"], weights=[6, 2, 2])[0]
    weight_unit = rng.choices(["kg", "lb"], weights=[7, 3])[0]
    height = {"cm": round(height_cm), "m": round(height_cm / 100, 2),
              "in": round(height_cm / IN_TO_CM)}[height_unit]
    weight = round(weight_kg, 1) if weight_unit == "kg" else round(weight_kg / LB_TO_KG, 1)
    return {WEIGHT: [weight, weight_unit], HEIGHT: [height, height_unit]}


_HEIGHT_WORDS = {"cm": ("cm", "centimeters"), "m": ("m", "meters"), "in": ("in", "inches")}
_WEIGHT_WORDS = {"kg": ("kg", "kilograms"), "lb": ("lb", "lbs", "pounds")}


def _body_measures(rng: random.Random, person: _Person, inputs: Mapping[str, Any],
                   keys: Sequence[str]) -> tuple[list[_Measure], list[str]]:
    """Height and/or weight as measured findings or as one free sentence."""
    texts = {}
    if HEIGHT in keys:
        value, unit = inputs[HEIGHT]
        texts[HEIGHT] = f"{_num(value)} {rng.choice(_HEIGHT_WORDS[unit])}"
    if WEIGHT in keys:
        value, unit = inputs[WEIGHT]
        texts[WEIGHT] = f"{_num(value)} {rng.choice(_WEIGHT_WORDS[unit])}"
    if len(texts) == 2 and rng.random() < 0.5:
        h, w = texts[HEIGHT], texts[WEIGHT]
        return [], [rng.choice([
            f"{_cap(person.he)} is {h} tall and weighs {w}.",
            f"{_cap(person.his)} height is {h} and {person.his} weight is {w}.",
            f"On examination, {person.he} weighed {w} with a height of {h}.",
        ])]
    if len(texts) == 1 and rng.random() < 0.4:
        (key, text), = texts.items()
        sentence = (f"{_cap(person.he)} weighs {text}." if key == WEIGHT
                    else f"{_cap(person.he)} is {text} tall.")
        return [], [sentence]
    labels = {HEIGHT: ("height",), WEIGHT: ("weight", "body weight")}
    return [_Measure("body", rng.choice(labels[k]), t) for k, t in texts.items()], []


def _note_bmi(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "a routine annual physical examination", "fatigue for several weeks",
        "knee pain when climbing stairs", "a request for nutritional counseling",
        "shortness of breath on exertion", "follow-up of blood pressure",
    ], settings=("the outpatient clinic", "a primary care clinic", "our clinic",
                 "the family medicine clinic"))
    measures, sentences = _body_measures(rng, person, inputs, [HEIGHT, WEIGHT])
    measures += _distractors(rng, {"height", "weight"})
    return _compose(rng, person, intro, measures, sentences)


def _explain_bmi(inputs: Inputs) -> str:
    h_value, h_unit = inputs[HEIGHT]
    height_m = _height_m(inputs[HEIGHT])
    if h_unit == "cm":
        h_line = (f"The patient's height is {_num(h_value)} cm, which is {_num(h_value)} cm * "
                  f"1 m / 100 cm = {_fmt(height_m, 4)} m.")
    elif h_unit == "in":
        h_line = (f"The patient's height is {_num(h_value)} in, which is {_num(h_value)} in * "
                  f"2.54 cm/in / 100 cm/m = {_fmt(height_m, 4)} m.")
    else:
        h_line = f"The patient's height is {_num(h_value)} m."
    w_line, kg = _weight_lines(inputs[WEIGHT])
    answer = format_decimal(bmi(inputs))
    return "\n".join([
        "The formula for computing the patient's BMI is (weight)/(height * height), where weight "
        "is the patient's weight in kg and height is the patient's height in m.",
        h_line,
        w_line,
        f"The patient's BMI is therefore {_fmt(kg)} kg / ({_fmt(height_m, 4)} m * "
        f"{_fmt(height_m, 4)} m) = {answer} kg/m².",
        _answer_sentence("BMI", answer, "kg/m²"),
    ])


# ----------------------------------------------------------------- 2. MAP


def _sample_map(rng: random.Random) -> Inputs:
    sbp = rng.randint(84, 198)
    dbp = rng.randint(max(40, sbp - 95), min(125, sbp - 18))
    return {SBP: [sbp, "mm Hg"], DBP: [dbp, "mm Hg"]}


def _note_map(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "a severe headache", "dizziness on standing", "chest discomfort", "blurred vision",
        "a fall at home", "palpitations", "fever and chills", "generalized weakness",
    ])
    sbp, dbp = int(inputs[SBP][0]), int(inputs[DBP][0])
    sentences = []
    measures = _distractors(rng, {"bp"})
    if rng.random() < 0.25:
        unit = rng.choice(_MMHG)
        sentences.append(rng.choice([
            f"{_cap(person.his)} systolic blood pressure was {sbp} {unit} and "
            f"{person.his} diastolic blood pressure was {dbp} {unit}.",
            f"The blood pressure measured {sbp} {unit} systolic and {dbp} {unit} diastolic.",
        ]))
    else:
        measures.append(_Measure("vitals", rng.choice(["blood pressure", "BP"]),
                                 _bp_text(rng, sbp, dbp)))
    return _compose(rng, person, intro, measures, sentences)


def _explain_map(inputs: Inputs) -> str:
    sbp, dbp = _num(inputs[SBP][0]), _num(inputs[DBP][0])
    value = mean_arterial_pressure(inputs)
    answer = format_decimal(value)
    total = 2 * float(inputs[DBP][0]) + float(inputs[SBP][0])
    return "\n".join([
        "The mean arterial pressure is computed by the formula MAP = 2/3 * (diastolic blood "
        "pressure) + 1/3 * (systolic blood pressure), that is, (2 * DBP + SBP) / 3.",
        f"The patient's systolic blood pressure is {sbp} mm Hg and the diastolic blood "
        f"pressure is {dbp} mm Hg.",
        f"Plugging in the values, we get (2 * {dbp} + {sbp}) / 3 = {_fmt(total)} / 3 = "
        f"{answer} mm Hg.",
        _answer_sentence("mean arterial pressure", answer, "mm Hg"),
    ])


# ----------------------------------------------------------------- 3. Cockcroft-Gault


def _sample_crcl(rng: random.Random) -> Inputs:
    sex = _random_sex(rng)
    age = rng.randint(18, 95)
    weight_kg = rng.uniform(42, 135)
    weight_unit = rng.choices(["kg", "lb"], weights=[8, 2])[0]
    weight = round(weight_kg, 1) if weight_unit == "kg" else round(weight_kg / LB_TO_KG, 1)
    cr_mg = rng.choice([rng.uniform(0.5, 1.6), rng.uniform(1.6, 6.5)])
    if rng.random() < 0.25:
        creatinine = [round(cr_mg * CREATININE_UMOL_PER_MG_DL), "µmol/L"]
    else:
        creatinine = [round(cr_mg, rng.choice([1, 2])), "mg/dL"]
    return {SEX: sex, AGE: [age, "years"], WEIGHT: [weight, weight_unit], CREATININE: creatinine}


def _note_crcl(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "a urinary tract infection requiring antibiotic dosing", "worsening leg swelling",
        "nausea and decreased oral intake", "community-acquired pneumonia",
        "a planned contrast CT scan", "cellulitis of the lower leg", "poorly controlled diabetes",
    ])
    measures, sentences = _body_measures(rng, person, inputs, [WEIGHT])
    value, unit = inputs[CREATININE]
    unit_text = unit if unit == "mg/dL" else rng.choice(["µmol/L", "umol/L", "micromol/L"])
    label = rng.choice(["creatinine", "serum creatinine", "plasma creatinine"])
    measures.append(_Measure("labs", label,
                             f"{_num(value)} {unit_text}"))
    measures += _distractors(rng, {"cr", "weight"})
    return _compose(rng, person, intro, measures, sentences)


def _explain_crcl(inputs: Inputs) -> str:
    age = _num(inputs[AGE][0])
    female = inputs[SEX] == "Female"
    factor = 0.85 if female else 1.0
    w_line, kg = _weight_lines(inputs[WEIGHT])
    cr_value, cr_unit = inputs[CREATININE]
    cr = _creatinine_mg_dl(inputs[CREATININE])
    if cr_unit == "mg/dL":
        cr_line = f"The concentration of creatinine is {_num(cr_value)} mg/dL."
    else:
        cr_line = (f"The concentration of creatinine is {_num(cr_value)} µmol/L. Dividing by "
                   f"{CREATININE_UMOL_PER_MG_DL} (µmol/L per mg/dL), this is {_num(cr_value)} / "
                   f"{CREATININE_UMOL_PER_MG_DL} = {_fmt(cr, 4)} mg/dL.")
    numerator = (140 - float(inputs[AGE][0])) * kg * factor
    denominator = 72 * cr
    answer = format_decimal(creatinine_clearance(inputs))
    return "\n".join([
        "The formula for computing Cockcroft-Gault is given by CrCl = ((140 - age) * weight * "
        "(gender_coefficient)) / (serum creatinine * 72), where the gender_coefficient is 1 if "
        "male and 0.85 if female, weight is the actual body weight in kg, and serum creatinine "
        "is in mg/dL.",
        f"The patient's gender is {'female' if female else 'male'}, which means that the gender "
        f"coefficient is {_num(factor)}.",
        f"The patient is {age} years old.",
        w_line,
        cr_line,
        f"Plugging the patient's values gives us ((140 - {age}) * {_fmt(kg)} * {_num(factor)}) / "
        f"({_fmt(cr, 4)} * 72) = {_fmt(numerator)} / {_fmt(denominator)} = {answer} mL/min.",
        _answer_sentence("creatinine clearance", answer, "mL/min"),
    ])


# ----------------------------------------------------------------- 4. Anion gap


def _sample_anion_gap(rng: random.Random) -> Inputs:
    unit = rng.choice(["mmol/L", "mEq/L"])
    while True:
        na = rng.randint(124, 156)
        cl = rng.randint(86, 120)
        hco3 = rng.randint(6, 34) if rng.random() < 0.8 else round(rng.uniform(6, 34), 1)
        if 3 <= na - cl - hco3 <= 36:
            return {SODIUM: [na, unit], CHLORIDE: [cl, unit], BICARBONATE: [hco3, unit]}


def _note_anion_gap(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "vomiting and abdominal pain", "confusion and rapid breathing",
        "polyuria and polydipsia", "profound weakness", "an intentional ingestion",
        "diarrhea for five days", "decreased urine output",
    ])
    labels = {
        SODIUM: ("sodium", "serum sodium", "Na"),
        CHLORIDE: ("chloride", "serum chloride", "Cl"),
        BICARBONATE: ("bicarbonate", "serum bicarbonate", "HCO3-"),
    }
    measures = [_Measure("labs", rng.choice(labels[k]), f"{_num(inputs[k][0])} {inputs[k][1]}")
                for k in (SODIUM, CHLORIDE, BICARBONATE)]
    measures += _distractors(rng, {"na"}, 2, 4)
    return _compose(rng, person, intro, measures)


def _explain_anion_gap(inputs: Inputs) -> str:
    lines = ["The formula for computing a patient's anion gap is: sodium (mEq/L) - (chloride "
             "(mEq/L) + bicarbonate (mEq/L))."]
    for key, name in ((SODIUM, "sodium"), (CHLORIDE, "chloride"), (BICARBONATE, "bicarbonate")):
        value, unit = _num(inputs[key][0]), inputs[key][1]
        if unit == "mEq/L":
            lines.append(f"The concentration of {name} is {value} mEq/L.")
        else:
            lines.append(f"The concentration of {name} is {value} mmol/L. Because {name} has a "
                         f"valence of 1, 1 mmol = 1 mEq, so this is {value} mEq/L.")
    na, cl, hco3 = (_num(inputs[k][0]) for k in (SODIUM, CHLORIDE, BICARBONATE))
    answer = format_decimal(anion_gap(inputs))
    lines.append(f"Plugging in these values into the anion gap formula gives us {na} mEq/L - "
                 f"({cl} mEq/L + {hco3} mEq/L) = {answer} mEq/L.")
    lines.append(_answer_sentence("anion gap", answer, "mEq/L"))
    return "\n".join(lines)


# ----------------------------------------------------------------- 5. Calcium correction


def _sample_calcium(rng: random.Random) -> Inputs:
    ca_mg = rng.uniform(6.4, 11.2)
    alb = rng.uniform(1.4, 5.0)
    if rng.random() < 0.2:
        calcium = [round(ca_mg / CALCIUM_MG_DL_PER_MMOL_L, 2), "mmol/L"]
    else:
        calcium = [round(ca_mg, 1), "mg/dL"]
    albumin = [round(alb * 10), "g/L"] if rng.random() < 0.2 else [round(alb, 1), "g/dL"]
    return {CALCIUM: calcium, ALBUMIN: albumin}


def _note_calcium(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "perioral tingling and muscle cramps", "weight loss and poor appetite",
        "generalized edema", "fatigue and constipation", "a hip fracture after a fall",
        "worsening ascites", "chronic diarrhea",
    ])
    ca, alb = inputs[CALCIUM], inputs[ALBUMIN]
    measures = [
        _Measure("labs", rng.choice(["calcium", "serum calcium", "total calcium"]),
                 f"{_num(ca[0])} {ca[1]}"),
        _Measure("labs", rng.choice(["albumin", "serum albumin"]), f"{_num(alb[0])} {alb[1]}"),
    ]
    measures += _distractors(rng, {"alb"}, 1, 4)
    return _compose(rng, person, intro, measures)


def _explain_calcium(inputs: Inputs) -> str:
    ca_value, ca_unit = inputs[CALCIUM]
    alb_value, alb_unit = inputs[ALBUMIN]
    ca, alb = _calcium_mg_dl(inputs[CALCIUM]), _albumin_g_dl(inputs[ALBUMIN])
    if ca_unit == "mg/dL":
        ca_line = f"The concentration of calcium is {_num(ca_value)} mg/dL."
    else:
        ca_line = (f"The concentration of calcium is {_num(ca_value)} mmol/L. Calcium has a molar "
                   f"mass of 40.08 g/mol, so this is {_num(ca_value)} * 4.008 = "
                   f"{_fmt(ca, 4)} mg/dL.")
    if alb_unit == "g/dL":
        alb_line = f"The concentration of albumin is {_num(alb_value)} g/dL."
    else:
        alb_line = (f"The concentration of albumin is {_num(alb_value)} g/L, which is "
                    f"{_num(alb_value)} / 10 = {_fmt(alb, 4)} g/dL.")
    answer = format_decimal(corrected_calcium(inputs))
    return "\n".join([
        "To compute the patient's corrected calcium level in mg/dL, the formula is (0.8 * "
        "(Normal Albumin (in g/dL) - Patient's Albumin (in g/dL))) + Serum Calcium (in mg/dL).",
        "The normal albumin concentration is set to 4 g/dL.",
        alb_line,
        ca_line,
        f"Plugging these values into the formula, we get (0.8 * (4 g/dL - {_fmt(alb, 4)} g/dL)) + "
        f"{_fmt(ca, 4)} mg/dL = {_fmt(0.8 * (4 - alb), 4)} + {_fmt(ca, 4)} = {answer} mg/dL.",
        _answer_sentence("corrected calcium concentration", answer, "mg/dL"),
    ])


# ----------------------------------------------------------------- 6. QTc Bazett


def _sample_qtc(rng: random.Random) -> Inputs:
    hr = rng.randint(42, 160)
    target_qtc = rng.uniform(370, 540)
    qt = int(min(max(round(target_qtc * math.sqrt(60 / hr)), 240), 620))
    return {HEART_RATE: [hr, "beats per minute"], QT: [qt, "msec"]}


def _note_qtc(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "palpitations", "an episode of syncope", "lightheadedness after starting a new antibiotic",
        "chest pain", "near-fainting while standing", "vomiting and poor oral intake",
    ])
    hr, qt = int(inputs[HEART_RATE][0]), int(inputs[QT][0])
    ms = rng.choice(["ms", "msec", "milliseconds"])
    bpm = rng.choice(_BPM)
    rhythm = "sinus tachycardia" if hr > 100 else "sinus bradycardia" if hr < 60 else "sinus rhythm"
    sentences, measures = [], []
    if rng.random() < 0.5:
        sentences.append(rng.choice([
            f"An electrocardiogram showed {rhythm} at {hr} {bpm} with a QT interval of {qt} {ms}.",
            f"The ECG demonstrated {rhythm}, heart rate {hr} {bpm}, and a QT interval of "
            f"{qt} {ms}.",
            f"A 12-lead ECG revealed a rate of {hr} {bpm} and a measured QT of {qt} {ms}.",
        ]))
    else:
        measures.append(_Measure("ecg", "QT interval", f"{qt} {ms}"))
        label = rng.choice(["heart rate", "ventricular rate"])
        measures.append(_Measure(rng.choice(["ecg", "vitals"]), label, f"{hr} {bpm}"))
    measures += _distractors(rng, {"hr"})
    if rng.random() < 0.5:
        sentences.append(rng.choice([
            "The PR interval was 160 ms and the QRS duration was 92 ms.",
            "There were no acute ST-segment changes.",
            "The QRS duration was 88 ms with a normal axis.",
        ]))
    return _compose(rng, person, intro, measures, sentences)


def _explain_qtc(inputs: Inputs) -> str:
    hr, qt = _num(inputs[HEART_RATE][0]), _num(inputs[QT][0])
    rr = 60 / float(inputs[HEART_RATE][0])
    answer = format_decimal(qtc_bazett(inputs))
    return "\n".join([
        "The corrected QT interval using the Bazett formula is computed as QTc = QT interval / "
        "√(RR interval), where the QT interval is in msec and the RR interval is in seconds, "
        "given as 60/(heart rate).",
        f"The patient's heart rate is {hr} beats per minute.",
        f"The QT interval is {qt} msec.",
        f"The RR interval is computed as 60/(heart rate), and so the RR interval is 60/{hr} = "
        f"{_fmt(rr, 6)} seconds, whose square root is {_fmt(math.sqrt(rr), 6)}.",
        f"Plugging in these values, we get {qt}/√({_fmt(rr, 6)}) = {qt}/"
        f"{_fmt(math.sqrt(rr), 6)} = {answer} msec.",
        _answer_sentence("corrected QT interval (QTc)", answer, "msec"),
    ])


# ----------------------------------------------------------------- 7. CHA2DS2-VASc


_CHA_NAMES = {
    CHF: (("congestive heart failure", "chronic heart failure",
           "heart failure with reduced ejection fraction"),
          ("congestive heart failure", "heart failure")),
    HTN: (("hypertension", "essential hypertension", "high blood pressure"), ("hypertension",)),
    DM: (("type 2 diabetes mellitus", "diabetes mellitus", "type 1 diabetes"),
         ("diabetes", "diabetes mellitus")),
    STROKE: (("a prior ischemic stroke", "a previous stroke"), ("stroke",)),
    TIA: (("a transient ischemic attack", "a prior TIA"), ("transient ischemic attack", "TIA")),
    THROMBO: (("a prior systemic thromboembolism", "a previous arterial thromboembolic event"),
              ("thromboembolism", "systemic embolism")),
    VASCULAR: (("a prior myocardial infarction", "peripheral artery disease",
                "complex aortic plaque"),
               ("vascular disease", "atherosclerotic vascular disease")),
}
_CHA_ORDER = (CHF, HTN, DM, STROKE, TIA, THROMBO, VASCULAR)


def _sample_cha(rng: random.Random) -> Inputs:
    age = rng.choice([rng.randint(35, 64), rng.randint(65, 74), rng.randint(75, 95)])
    inputs: Inputs = {SEX: _random_sex(rng), AGE: [age, "years"]}
    probabilities = {CHF: 0.3, HTN: 0.55, DM: 0.35, STROKE: 0.15, TIA: 0.12, THROMBO: 0.08,
                     VASCULAR: 0.3}
    for key in _CHA_ORDER:
        inputs[key] = rng.random() < probabilities[key]
    return inputs


def _note_cha(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "palpitations and was found to be in atrial fibrillation",
        "newly diagnosed atrial fibrillation", "an irregular heartbeat noted at a routine visit",
        "fatigue and an irregularly irregular pulse",
        "dyspnea and atrial fibrillation with rapid ventricular response",
    ])
    present, absent = [], []
    for key in _CHA_ORDER:
        pos, neg = _CHA_NAMES[key]
        if inputs[key]:
            present.append(rng.choice(pos))
        else:
            absent.append(rng.choice(neg))
    present += rng.sample(_OTHER_HISTORY, rng.randint(0, 2))
    sentences = _history_sentences(rng, person, present, absent)
    measures = _distractors(rng, {"bp", "glucose"}, 1, 3)
    return _compose(rng, person, intro, measures, sentences)


def _explain_cha(inputs: Inputs) -> str:
    age = int(inputs[AGE][0])
    lines = ["The CHA2DS2-VASc score adds 1 point each for congestive heart failure, hypertension, "
             "diabetes, vascular disease, age 65 to 74 years and female sex, and 2 points each for "
             "age 75 years or older and prior stroke, TIA or thromboembolism.",
             "The current CHA2DS2-VASc score is 0."]
    total = 0
    if age >= 75:
        total, part = _running(total, 2)
        lines.append(f"The patient is {age} years old. Because the age is 75 years or older, two "
                     f"points are added to the score, {part}.")
    elif age >= 65:
        total, part = _running(total, 1)
        lines.append(f"The patient is {age} years old. Because the age is between 65 and 74 years, "
                     f"one point is added to the score, {part}.")
    else:
        lines.append(f"The patient is {age} years old. Because the age is less than 65 years, no "
                     f"points are added to the score, keeping the current total at {total}.")
    if inputs[SEX] == "Female":
        total, part = _running(total, 1)
        lines.append(f"The patient's gender is female and so one point is added, {part}.")
    else:
        lines.append(f"The patient's gender is male and so no points are added, keeping the "
                     f"current "
                     f"total at {total}.")
    for key, name in ((CHF, "congestive heart failure"), (HTN, "hypertension")):
        if inputs[key]:
            total, part = _running(total, 1)
            lines.append(f"The patient history for {name} is present, so one point is added, "
                         f"{part}.")
        else:
            lines.append(f"The patient history for {name} is absent, so no points are added, "
                         f"keeping the current total at {total}.")
    flags = [f"{name} is {'present' if inputs[key] else 'absent'}" for key, name in
             ((STROKE, "stroke"), (TIA, "TIA"), (THROMBO, "thromboembolism"))]
    if inputs[STROKE] or inputs[TIA] or inputs[THROMBO]:
        total, part = _running(total, 2)
        verdict = f"Because at least one of these is present, two points are added, {part}."
    else:
        verdict = (f"Because none of these is present, no points are added, keeping the current "
                   f"total at {total}.")
    lines.append(f"Based on the patient note, the history of {_join(flags)}. {verdict}")
    for key, name in ((VASCULAR, "vascular disease"), (DM, "diabetes")):
        if inputs[key]:
            total, part = _running(total, 1)
            lines.append(f"The patient history for {name} is present, so one point is added, "
                         f"{part}.")
        else:
            lines.append(f"The patient history for {name} is absent, so no points are added, "
                         f"keeping the current total at {total}.")
    lines.append(f"The patient's CHA2DS2-VASc Score is {total}.")
    return "\n".join(lines)


# ----------------------------------------------------------------- 8. CURB-65


def _sample_curb(rng: random.Random) -> Inputs:
    age = rng.choice([rng.randint(22, 64), rng.randint(65, 94)])
    bun = rng.choice([rng.randint(6, 19), rng.randint(20, 60), rng.choice([19, 20])])
    if rng.random() < 0.2:
        bun = round(bun + rng.random(), 1)
    rr = rng.choice([rng.randint(12, 29), rng.randint(30, 40)])
    if rng.random() < 0.35:
        sbp = rng.randint(74, 100)
        dbp = rng.randint(38, min(64, sbp - 18))
    else:
        sbp = rng.randint(95, 170)
        dbp = rng.randint(55, min(98, sbp - 20))
    return {
        AGE: [age, "years"],
        CONFUSION: rng.random() < 0.3,
        BUN: [bun, "mg/dL"],
        RESP_RATE: [rr, "breaths per minute"],
        SBP: [sbp, "mm Hg"],
        DBP: [dbp, "mm Hg"],
    }


def _note_curb(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "three days of productive cough and fever", "fever, chills and pleuritic chest pain",
        "worsening shortness of breath and a cough", "cough with rusty sputum",
        "fever and right-sided chest pain", "lethargy and cough",
    ])
    he, his = person.he, person.his
    if inputs[CONFUSION]:
        confusion = rng.choice([
            f"{_cap(he)} was confused and disoriented to time and place.",
            f"On examination {he} was newly confused.",
            f"{_cap(his)} family reported new-onset confusion.",
            f"{_cap(he)} appeared disoriented and could not state the date.",
        ])
    else:
        confusion = rng.choice([
            f"{_cap(he)} was alert and oriented to person, place, and time.",
            f"{_cap(he)} was awake, alert, and fully oriented.",
            "There was no confusion.",
            f"Mental status was normal and {he} was not confused.",
        ])
    sbp, dbp = int(inputs[SBP][0]), int(inputs[DBP][0])
    measures = [
        _Measure("vitals", rng.choice(["blood pressure", "BP"]), _bp_text(rng, sbp, dbp)),
        _Measure("vitals", rng.choice(["respiratory rate", "respiration rate"]),
                 _val(rng, inputs[RESP_RATE][0], _BREATHS)),
        _Measure("labs", rng.choice(["BUN", "blood urea nitrogen", "serum urea nitrogen"]),
                 f"{_num(inputs[BUN][0])} mg/dL"),
    ]
    measures += _distractors(rng, {"bp", "rr", "bun"}, 1, 4)
    xray = rng.choice([
        "Chest radiography showed a right lower lobe consolidation.",
        "A chest X-ray revealed left lower lobe infiltrates.",
        "Chest imaging demonstrated multilobar opacities.",
    ])
    return _compose(rng, person, intro, measures, [confusion, xray])


def _explain_curb(inputs: Inputs) -> str:
    age = _num(inputs[AGE][0])
    bun, rr = _num(inputs[BUN][0]), _num(inputs[RESP_RATE][0])
    sbp, dbp = _num(inputs[SBP][0]), _num(inputs[DBP][0])
    lines = ["The CURB-65 score adds one point each for confusion, BUN > 19 mg/dL, respiratory "
             "rate >= 30 breaths per minute, systolic blood pressure < 90 mm Hg or diastolic "
             "blood pressure <= 60 mm Hg, and age >= 65 years.",
             "The CURB-65 score is currently at 0 points."]
    total = 0
    if float(inputs[AGE][0]) >= 65:
        total, part = _running(total, 1)
        lines.append(f"The patient is {age} years old. The age is 65 years or older, so one point "
                     f"is added, {part}.")
    else:
        lines.append(f"The patient is {age} years old. The age is less than 65 years, so no "
                     f"points are "
                     f"added, keeping the current total at {total}.")
    if inputs[CONFUSION]:
        total, part = _running(total, 1)
        lines.append(f"The note reports that the patient is confused, so one point is added, "
                     f"{part}.")
    else:
        lines.append(f"The note reports that the patient is not confused, so no points are added, "
                     f"keeping the current total at {total}.")
    if float(inputs[BUN][0]) > 19:
        total, part = _running(total, 1)
        lines.append(f"The BUN is {bun} mg/dL, which is greater than 19 mg/dL, so one point is "
                     f"added, {part}.")
    else:
        lines.append(f"The BUN is {bun} mg/dL, which is not greater than 19 mg/dL, so no "
                     f"points are "
                     f"added, keeping the current total at {total}.")
    if float(inputs[RESP_RATE][0]) >= 30:
        total, part = _running(total, 1)
        lines.append(f"The respiratory rate is {rr} breaths per minute, which is at least 30, "
                     f"so one "
                     f"point is added, {part}.")
    else:
        lines.append(f"The respiratory rate is {rr} breaths per minute, which is less than 30, "
                     f"so no "
                     f"points are added, keeping the current total at {total}.")
    low_bp = float(inputs[SBP][0]) < 90 or float(inputs[DBP][0]) <= 60
    head = (f"The systolic blood pressure is {sbp} mm Hg and the diastolic blood pressure is {dbp} "
            f"mm Hg. A point is added if the systolic pressure is less than 90 mm Hg or the "
            f"diastolic pressure is at most 60 mm Hg.")
    if low_bp:
        total, part = _running(total, 1)
        lines.append(f"{head} This criterion is met, so one point is added, {part}.")
    else:
        lines.append(f"{head} Neither is true, so no points are added, keeping the current "
                     f"total at {total}.")
    lines.append(f"The patient's CURB-65 score is {total}.")
    return "\n".join(lines)


# ----------------------------------------------------------------- 9. Wells' PE

_WELLS_FLAGS = (DVT_SIGNS, PE_LIKELY, IMMOBILIZED, SURGERY, PRIOR_PE, PRIOR_DVT, HEMOPTYSIS,
                MALIGNANCY)


def _sample_wells(rng: random.Random) -> Inputs:
    probabilities = {DVT_SIGNS: 0.3, PE_LIKELY: 0.4, IMMOBILIZED: 0.2, SURGERY: 0.2,
                     PRIOR_PE: 0.15, PRIOR_DVT: 0.15, HEMOPTYSIS: 0.15, MALIGNANCY: 0.2}
    hr = rng.choice([rng.randint(58, 100), rng.randint(101, 145), 100])
    inputs: Inputs = {HEART_RATE: [hr, "beats per minute"]}
    for key in _WELLS_FLAGS:
        inputs[key] = rng.random() < probabilities[key]
    return inputs


_WELLS_TEXT: dict[tuple[str, bool], tuple[str, ...]] = {
    (DVT_SIGNS, True): (
        "{His} {side} calf was swollen and tender to palpation.",
        "Examination revealed unilateral {side} leg swelling with tenderness along the deep veins.",
        "There was pitting edema and pain of the {side} lower leg, consistent with deep vein "
        "thrombosis.",
    ),
    (DVT_SIGNS, False): (
        "There was no leg swelling or calf tenderness.",
        "Examination of the legs showed no signs of deep vein thrombosis.",
        "Both calves were soft and non-tender without edema.",
    ),
    (PE_LIKELY, True): (
        "Pulmonary embolism was considered the most likely diagnosis.",
        "The treating team felt that pulmonary embolism was the leading diagnosis.",
        "No alternative diagnosis was thought to be more likely than pulmonary embolism.",
    ),
    (PE_LIKELY, False): (
        "{Alternative} was considered more likely than pulmonary embolism.",
        "An alternative diagnosis was favored over pulmonary embolism.",
        "The team felt a pulmonary embolism was less likely than other causes.",
    ),
    (IMMOBILIZED, True): (
        "{He} had been bedridden for {days} days because of a back injury.",
        "{He} had been immobilized in bed for the past {days} days.",
        "{He} had been confined to bed for {days} days with a leg cast.",
    ),
    (IMMOBILIZED, False): (
        "{He} had been fully ambulatory.",
        "{He} has not been immobilized recently.",
        "{He} walks daily and has had no recent bed rest.",
    ),
    (SURGERY, True): (
        "{He} underwent {surgery} {weeks} ago.",
        "{He} had surgery {surgery_days} days ago.",
    ),
    (SURGERY, False): (
        "{He} has had no surgery in the past 4 weeks.",
        "There was no recent surgery.",
        "{His} only operation was an appendectomy {years} years ago.",
    ),
    (PRIOR_PE, True): (
        "{He} had a pulmonary embolism {years} years ago.",
        "{His} history includes a previously documented pulmonary embolism.",
    ),
    (PRIOR_PE, False): (
        "{He} has no history of pulmonary embolism.",
        "There is no prior pulmonary embolism.",
    ),
    (PRIOR_DVT, True): (
        "{He} had a deep vein thrombosis of the {side} leg in the past.",
        "{His} history is notable for a previously documented deep vein thrombosis.",
    ),
    (PRIOR_DVT, False): (
        "{He} has never had a deep vein thrombosis.",
        "There is no prior history of deep vein thrombosis.",
    ),
    (HEMOPTYSIS, True): (
        "{He} reported coughing up blood-streaked sputum.",
        "{He} endorsed hemoptysis.",
    ),
    (HEMOPTYSIS, False): (
        "{He} denied hemoptysis.",
        "There was no hemoptysis.",
    ),
    (MALIGNANCY, True): (
        "{He} is receiving chemotherapy for {cancer}.",
        "{He} was diagnosed with {cancer} {months} months ago and is currently on treatment.",
        "{He} is receiving palliative care for advanced {cancer}.",
    ),
    (MALIGNANCY, False): (
        "{He} has no history of cancer.",
        "There is no known malignancy.",
    ),
}
_ALTERNATIVES = ("pneumonia", "an acute coronary syndrome", "a COPD exacerbation",
                 "musculoskeletal chest pain", "a pericarditis flare")


def _wells_sentence(rng: random.Random, person: _Person, key: str, present: bool) -> str:
    """A sentence stating (or denying) one Wells' criterion."""
    surgeries = ["a total knee replacement", "a hip replacement", "a laparoscopic cholecystectomy",
                 "an abdominal hysterectomy" if person.female else "an inguinal hernia repair"]
    cancers = ["colon cancer", "lung cancer", "pancreatic cancer", "lymphoma",
               "breast cancer" if person.female else "prostate cancer"]
    return rng.choice(_WELLS_TEXT[(key, present)]).format(
        He=_cap(person.he), His=_cap(person.his), side=rng.choice(["left", "right"]),
        Alternative=_cap(rng.choice(_ALTERNATIVES)), days=rng.randint(3, 14),
        surgery=rng.choice(surgeries), weeks=rng.choice(["one week", "two weeks", "three weeks"]),
        surgery_days=rng.randint(5, 25), years=rng.randint(2, 30), months=rng.randint(1, 5),
        cancer=rng.choice(cancers),
    )


def _note_wells(inputs: Inputs, rng: random.Random) -> str:
    person = _person(inputs, rng)
    intro = _intro(rng, person, [
        "sudden-onset shortness of breath", "pleuritic chest pain", "dyspnea and chest tightness",
        "acute shortness of breath and lightheadedness", "chest pain worse with deep breathing",
    ])
    sentences = [_wells_sentence(rng, person, key, bool(inputs[key])) for key in _WELLS_FLAGS]
    measures = [_Measure("vitals", rng.choice(["heart rate", "pulse"]),
                         _val(rng, inputs[HEART_RATE][0], _BPM))]
    measures += _distractors(rng, {"hr"}, 1, 4)
    return _compose(rng, person, intro, measures, sentences, closing=False)


def _explain_wells(inputs: Inputs) -> str:
    total = 0.0
    lines = ["Wells' criteria for pulmonary embolism add 3 points each for clinical signs of DVT "
             "and PE being the most likely diagnosis, 1.5 points each for heart rate > 100, "
             "immobilization for at least 3 days or surgery in the previous 4 weeks, and a "
             "previous PE or DVT, and 1 point each for hemoptysis and malignancy.",
             "The Wells' score for pulmonary embolism is currently 0."]

    def step(met: bool, points: float, yes: str, no: str) -> None:
        nonlocal total
        if met:
            total, part = _running(total, points, integer=False)
            lines.append(f"{yes}, so {format_decimal(points, 1)} points are added, {part}.")
        else:
            lines.append(f"{no}, so the score is unchanged, keeping the current total at "
                         f"{format_decimal(total, 1)}.")

    step(inputs[DVT_SIGNS], 3, "Clinical signs and symptoms of DVT are present",
         "Clinical signs and symptoms of DVT are absent")
    step(inputs[PE_LIKELY], 3, "Pulmonary embolism is the most likely diagnosis",
         "Pulmonary embolism is not the most likely diagnosis")
    hr = _num(inputs[HEART_RATE][0])
    step(float(inputs[HEART_RATE][0]) > 100, 1.5,
         f"The patient's heart rate is {hr} beats per minute, which is more than 100",
         f"The patient's heart rate is {hr} beats per minute, which is not more than 100")
    def state(flag: bool, yes: str = "present", no: str = "absent") -> str:
        return yes if flag else no

    recent = (f"Immobilization for at least 3 days is {state(inputs[IMMOBILIZED])} and surgery "
              f"in the previous 4 weeks is {state(inputs[SURGERY])}")
    step(inputs[IMMOBILIZED] or inputs[SURGERY], 1.5, f"{recent}; at least one is present",
         f"{recent}")
    prior = (f"A previous pulmonary embolism is "
             f"{state(inputs[PRIOR_PE], 'documented', 'not documented')} and a previous deep vein "
             f"thrombosis is {state(inputs[PRIOR_DVT], 'documented', 'not documented')}")
    step(inputs[PRIOR_PE] or inputs[PRIOR_DVT], 1.5, f"{prior}; at least one is present", prior)
    step(inputs[HEMOPTYSIS], 1, "Hemoptysis is present", "Hemoptysis is absent")
    malignancy = "Malignancy with treatment within 6 months or palliative care"
    step(inputs[MALIGNANCY], 1, f"{malignancy} is present", f"{malignancy} is absent")
    lines.append(f"The patient's Wells' score for pulmonary embolism is "
                 f"{format_decimal(total, 1)}.")
    return "\n".join(lines)


# ----------------------------------------------------------------- 10. Due date

_FIRST_LMP, _LAST_LMP = date(2000, 1, 1), date(2025, 12, 31)


def _sample_due(rng: random.Random) -> Inputs:
    lmp = _FIRST_LMP + timedelta(days=rng.randint(0, (_LAST_LMP - _FIRST_LMP).days))
    cycle = rng.choice([28, 28, rng.randint(21, 35)])
    return {LMP: lmp.strftime(DATE_FORMAT), CYCLE: cycle}


def _long_date(day: date) -> str:
    return f"{day.strftime('%B')} {day.day}, {day.year}"


def _note_due(inputs: Inputs, rng: random.Random) -> str:
    person = _Person(rng.randint(17, 44), "Female")
    lmp = _parse_date(inputs[LMP])
    shown = inputs[LMP] if rng.random() < 0.75 else _long_date(lmp)
    cycle = inputs[CYCLE]
    gravida = rng.randint(1, 5)
    para = rng.randint(0, gravida - 1)
    a, age = _article(person.age), person.age
    intro = rng.choice([
        f"{_cap(a)} {age}-year-old G{gravida}P{para} woman presents for her first prenatal visit.",
        f"{_cap(a)} {age}-year-old woman comes to the clinic after a positive pregnancy test.",
        f"The patient is {a} {age}-year-old woman seen for nausea and a missed period.",
        f"{_cap(a)} {age} year old woman, gravida {gravida} para {para}, is evaluated for "
        "confirmation of pregnancy.",
    ])
    sentences = [
        rng.choice([
            f"Her last menstrual period began on {shown}.",
            f"She reports that her last menstrual period started on {shown}.",
            f"The first day of her last menstrual period was {shown}.",
            f"LMP: {shown}.",
        ]),
        rng.choice([
            f"Her cycles are regular, occurring every {cycle} days.",
            f"She reports a regular menstrual cycle length of {cycle} days.",
            f"Her cycle length is {cycle} days.",
            f"Her menses typically occur every {cycle} days.",
        ]),
    ]
    extras = [
        f"Menarche was at age {rng.randint(10, 15)}.",
        "A urine hCG test was positive.",
        "She takes a daily prenatal vitamin.",
        "She has no chronic medical conditions.",
        "She reports mild morning nausea without vomiting.",
    ]
    sentences += rng.sample(extras, rng.randint(0, 2))
    unrelated = {"hr", "rr", "wbc", "plt", "ast", "lactate", "bun", "cr", "alb", "na", "k"}
    measures = _distractors(rng, unrelated, 0, 2)
    return _compose(rng, person, intro, measures, sentences, social=False, closing=False)


def _explain_due(inputs: Inputs) -> str:
    lmp = _parse_date(inputs[LMP])
    cycle = int(inputs[CYCLE])
    forty_weeks = lmp + timedelta(days=280)
    final = due_date(inputs)
    shift = cycle - 28
    if shift > 0:
        adjust = (f"Because the patient's cycle length is {cycle} days, which is {shift} days "
                  f"longer "
                  f"than 28 days, we add {shift} days, giving {final.strftime(DATE_FORMAT)}.")
    elif shift < 0:
        adjust = (f"Because the patient's cycle length is {cycle} days, which is {-shift} days "
                  f"shorter "
                  f"than 28 days, we subtract {-shift} days, giving {final.strftime(DATE_FORMAT)}.")
    else:
        adjust = "Because the patient's cycle length is 28 days, no adjustment is needed."
    return "\n".join([
        "The patient's estimated due date is computed with Naegele's Rule: add 40 weeks (280 days) "
        "to the first day of the last menstrual period, then add or subtract the number of days by "
        "which the cycle length differs from the standard 28 days.",
        f"The patient's last menstrual period was {lmp.strftime(DATE_FORMAT)}.",
        f"The date after adding 40 weeks to the last menstrual period is "
        f"{forty_weeks.strftime(DATE_FORMAT)}.",
        adjust,
        _answer_sentence("estimated due date", final.strftime(DATE_FORMAT)),
    ])


# ===================================================================== registry and rows


@dataclass(frozen=True)
class Calculator:
    """One calculator: metadata, an input sampler, the formula, and note/explanation renderers."""

    key: str
    name: str
    calculator_id: int
    category: str
    output_type: str  # "decimal", "integer" or "date"
    question: str
    sample: Callable[[random.Random], Inputs]
    compute: Callable[[Mapping[str, Any]], Any]
    render_note: Callable[[Inputs, random.Random], str]
    render_explanation: Callable[[Inputs], str]
    exact_limits: bool = False  # decimal answers that must match exactly (Wells' PE)

    def format_answer(self, value: Any) -> str:
        if self.output_type == "date":
            return value.strftime(DATE_FORMAT)
        if self.output_type == "integer":
            return str(int(value))
        return format_decimal(float(value))

    def limits(self, answer: str) -> tuple[str, str]:
        """(Lower Limit, Upper Limit): ±5% for decimals, the answer itself otherwise."""
        if self.output_type != "decimal" or self.exact_limits:
            return answer, answer
        value = float(answer)
        low, high = sorted((value * 0.95, value * 1.05))
        return format_decimal(low, 6), format_decimal(high, 6)

    def make_row(self, rng: random.Random, index: int) -> dict[str, str]:
        """Row `index` (0-based) of a dataset, drawing everything from `rng`."""
        inputs = self.sample(rng)
        answer = self.format_answer(self.compute(inputs))
        lower, upper = self.limits(answer)
        return {
            "Row Number": str(index + 1),
            "Calculator ID": str(self.calculator_id),
            "Calculator Name": self.name,
            "Category": self.category,
            "Output Type": self.output_type,
            "Note ID": f"synth-{self.key}-{index}",
            "Note Type": "Synthetic",
            "Patient Note": self.render_note(inputs, rng),
            "Question": self.question,
            "Relevant Entities": json.dumps(inputs, ensure_ascii=False),
            "Ground Truth Answer": answer,
            "Lower Limit": lower,
            "Upper Limit": upper,
            "Ground Truth Explanation": self.render_explanation(inputs),
        }


CALCULATORS: dict[str, Calculator] = {
    calc.key: calc
    for calc in (
        Calculator(
            "bmi", "Body Mass Index (BMI)", 6, "physical", "decimal",
            "What is the patient's body mass index (BMI)? Your answer should be in terms of kg/m².",
            _sample_bmi, bmi, _note_bmi, _explain_bmi,
        ),
        Calculator(
            "map", "Mean Arterial Pressure (MAP)", 5, "physical", "decimal",
            "What is patient's mean arterial pressure in mm Hg?",
            _sample_map, mean_arterial_pressure, _note_map, _explain_map,
        ),
        Calculator(
            "crcl", "Creatinine Clearance (Cockcroft-Gault Equation)", 2, "lab", "decimal",
            "What is the patient's Creatinine Clearance using the Cockroft-Gault Equation in terms "
            "of mL/min? Use the patient's actual body weight in kg.",
            _sample_crcl, creatinine_clearance, _note_crcl, _explain_crcl,
        ),
        Calculator(
            "anion_gap", "Anion Gap", 39, "lab", "decimal",
            "What is the patient's anion gap in terms of mEq/L?",
            _sample_anion_gap, anion_gap, _note_anion_gap, _explain_anion_gap,
        ),
        Calculator(
            "calcium", "Calcium Correction for Hypoalbuminemia", 7, "lab", "decimal",
            "Using the Calcium Correction for Hypoalbuminemia formula, what is the patient's "
            "corrected calcium in mg/dL? You may set the normal albumin concentration to 4 g/dL.",
            _sample_calcium, corrected_calcium, _note_calcium, _explain_calcium,
        ),
        Calculator(
            "qtc_bazett", "QTc Bazett Calculator", 11, "physical", "decimal",
            "Using the Bazett Formula for corrected QT interval, what is the patient's corrected "
            "QT interval in msec?",
            _sample_qtc, qtc_bazett, _note_qtc, _explain_qtc,
        ),
        Calculator(
            "cha2ds2_vasc", "CHA2DS2-VASc Score for Atrial Fibrillation Stroke Risk", 4, "risk",
            "integer",
            "What is the patient's CHA2DS2-VASc Score?",
            _sample_cha, cha2ds2_vasc, _note_cha, _explain_cha,
        ),
        Calculator(
            "curb_65", "CURB-65 Score for Pneumonia Severity", 45, "severity", "integer",
            "What is the patient's CURB-65 score?",
            _sample_curb, curb_65, _note_curb, _explain_curb,
        ),
        Calculator(
            "wells_pe", "Wells' Criteria for Pulmonary Embolism", 8, "diagnosis", "decimal",
            "What is the patient's score of Wells' criteria for Pulmonary Embolism?",
            _sample_wells, wells_pe, _note_wells, _explain_wells, exact_limits=True,
        ),
        Calculator(
            "due_date", "Estimated Due Date", 13, "date", "date",
            "Using Naegele's Rule for estimated due date based on the last menstrual period and "
            "cycle length, what is the patient's estimated due date? Your response should be in "
            "the format of M/D/Y (ie 08/31/2023, 07/03/2000) with just the date and not other "
            "text.",
            _sample_due, due_date, _note_due, _explain_due,
        ),
    )
}


def generate_rows(n: int, seed: int = 0,
                  calculators: Sequence[str] | None = None) -> list[dict[str, str]]:
    """`n` synthetic rows, deterministic for `seed`.

    Rows cycle over the calculators (all of `CALCULATORS` by default, else the given keys) in
    blocks: each block of len(calculators) rows holds every calculator once, in a seeded order,
    so every calculator appears when n >= len(calculators). A shorter `n` gives a prefix of
    the rows of a longer one with the same seed and calculators.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    keys = list(CALCULATORS) if calculators is None else list(calculators)
    if not keys:
        raise ValueError("calculators must name at least one calculator")
    unknown = [key for key in keys if key not in CALCULATORS]
    if unknown:
        raise ValueError(f"unknown calculator(s) {unknown}; known: {', '.join(CALCULATORS)}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    order: list[str] = []
    for index in range(n):
        if index % len(keys) == 0:
            order = keys[:]
            rng.shuffle(order)
        rows.append(CALCULATORS[order[index % len(keys)]].make_row(rng, index))
    return rows
