"""The ten calculators' formulas, as functions of a row's `Relevant Entities` object, with the unit
conversions they need. Numbers arrive as `[value, unit]` pairs in the unit the note uses; findings
of the scores are booleans; the due-date inputs are a date string and an integer."""

from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Any, Mapping, Sequence

# ===================================================================== entity keys and units

# Keys of `Relevant Entities` (MedCalc-Bench's names) shared by several calculators.
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

# Unit conversions (exact definitions or standard clinical factors).
LB_TO_KG = 0.45359237
IN_TO_CM = 2.54
CREATININE_UMOL_PER_MG_DL = 88.4  # µmol/L per mg/dL (molar mass 113.12 g/mol)
CALCIUM_MG_DL_PER_MMOL_L = 4.008  # mg/dL per mmol/L (molar mass 40.08 g/mol)
DATE_FORMAT = "%m/%d/%Y"  # the due-date inputs and answers


# Each `[value, unit]` entity in the unit its formula uses.
def weight_in_kg(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "kg":
        return value
    if unit == "lb":
        return value * LB_TO_KG
    raise ValueError(f"unknown weight unit {unit!r}")


def height_in_m(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "cm":
        return value / 100
    if unit == "m":
        return value
    if unit == "in":
        return value * IN_TO_CM / 100
    raise ValueError(f"unknown height unit {unit!r}")


def creatinine_in_mg_dl(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "mg/dL":
        return value
    if unit == "µmol/L":
        return value / CREATININE_UMOL_PER_MG_DL
    raise ValueError(f"unknown creatinine unit {unit!r}")


def calcium_in_mg_dl(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "mg/dL":
        return value
    if unit == "mmol/L":
        return value * CALCIUM_MG_DL_PER_MMOL_L
    raise ValueError(f"unknown calcium unit {unit!r}")


def albumin_in_g_dl(entity: Sequence[Any]) -> float:
    value, unit = float(entity[0]), entity[1]
    if unit == "g/dL":
        return value
    if unit == "g/L":
        return value / 10
    raise ValueError(f"unknown albumin unit {unit!r}")


# ===================================================================== formulas


def bmi(inputs: Mapping[str, Any]) -> float:
    """Body mass index in kg/m²: weight / height²."""
    return weight_in_kg(inputs[WEIGHT]) / height_in_m(inputs[HEIGHT]) ** 2


def mean_arterial_pressure(inputs: Mapping[str, Any]) -> float:
    """MAP in mm Hg: (2 × diastolic + systolic) / 3."""
    return (2 * float(inputs[DBP][0]) + float(inputs[SBP][0])) / 3


def creatinine_clearance(inputs: Mapping[str, Any]) -> float:
    """Cockcroft-Gault creatinine clearance in mL/min, with actual body weight.

    (140 − age) × weight kg × (0.85 if female) / (72 × serum creatinine mg/dL).
    """
    sex_factor = 0.85 if inputs[SEX] == "Female" else 1.0
    age = float(inputs[AGE][0])
    return (140 - age) * weight_in_kg(inputs[WEIGHT]) * sex_factor / (
        72 * creatinine_in_mg_dl(inputs[CREATININE])
    )


def anion_gap(inputs: Mapping[str, Any]) -> float:
    """Anion gap in mEq/L: Na − (Cl + HCO3)."""
    return float(inputs[SODIUM][0]) - (float(inputs[CHLORIDE][0]) + float(inputs[BICARBONATE][0]))


def corrected_calcium(inputs: Mapping[str, Any]) -> float:
    """Calcium corrected for albumin in mg/dL: Ca + 0.8 × (4 − albumin g/dL)."""
    return calcium_in_mg_dl(inputs[CALCIUM]) + 0.8 * (4.0 - albumin_in_g_dl(inputs[ALBUMIN]))


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
    lmp = parse_date(inputs[LMP])
    return lmp + timedelta(days=280 + int(inputs[CYCLE]) - 28)


def parse_date(text: str) -> date:
    """A `DATE_FORMAT` (M/D/Y) date string as a date."""
    month, day, year = (int(part) for part in text.split("/"))
    return date(year, month, day)
