"""The ten calculators: for each, how its inputs are sampled, its note, its step-by-step
explanation, and its `Calculator` spec (metadata, question, formula); `CALCULATORS` and
`generate_rows` put them to work. All randomness comes from the `rng` passed along, in a fixed
order: the same seed gives the same rows, byte for byte."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Callable, Mapping, Sequence

from talr.tasks.medcalc_synth.formulas import (  # entity keys, units, then the formulas
    AGE, ALBUMIN, BICARBONATE, BUN, CALCIUM, CHF, CHLORIDE, CONFUSION, CREATININE, CYCLE, DBP, DM, DVT_SIGNS,
    HEART_RATE, HEIGHT, HEMOPTYSIS, HTN, IMMOBILIZED, LMP, MALIGNANCY, PE_LIKELY, PRIOR_DVT, PRIOR_PE, QT,
    RESP_RATE, SBP, SEX, SODIUM, STROKE, SURGERY, THROMBO, TIA, VASCULAR, WEIGHT,
    CALCIUM_MG_DL_PER_MMOL_L, CREATININE_UMOL_PER_MG_DL, DATE_FORMAT, IN_TO_CM, LB_TO_KG,
    albumin_in_g_dl, calcium_in_mg_dl, creatinine_in_mg_dl, height_in_m, parse_date, weight_in_kg,
    anion_gap, bmi, cha2ds2_vasc, corrected_calcium, creatinine_clearance, curb_65, due_date,
    mean_arterial_pressure, qtc_bazett, wells_pe,
)
from talr.tasks.medcalc_synth.prose import (
    BPM, BREATHS, MMHG, OTHER_HISTORY, Measure, Person, article_for, body_measures, bp_text, cap_first,
    compose_note, distractors, format_decimal, history_sentences, intro_sentence, join_words, number_text,
    patient, random_sex, value_text,
)

Inputs = dict[str, Any]  # a row's `Relevant Entities`

# ===================================================================== explanations helpers


def _fmt(value: float, places: int = 3) -> str:
    """An intermediate result in an explanation."""
    return format_decimal(value, places)


def _weight_lines(entity: Sequence[Any]) -> tuple[str, float]:
    kg = weight_in_kg(entity)
    if entity[1] == "lb":
        line = (f"The patient's weight is {number_text(entity[0])} lb, which is {number_text(entity[0])} lb * "
                f"{LB_TO_KG} kg/lb = {_fmt(kg)} kg.")
    else:
        line = f"The patient's weight is {number_text(entity[0])} kg."
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


def _note_bmi(inputs: Inputs, rng: random.Random) -> str:
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
        "a routine annual physical examination", "fatigue for several weeks",
        "knee pain when climbing stairs", "a request for nutritional counseling",
        "shortness of breath on exertion", "follow-up of blood pressure",
    ], settings=("the outpatient clinic", "a primary care clinic", "our clinic",
                 "the family medicine clinic"))
    measures, sentences = body_measures(rng, person, inputs, [HEIGHT, WEIGHT])
    measures += distractors(rng, {"height", "weight"})
    return compose_note(rng, person, intro, measures, sentences)


def _explain_bmi(inputs: Inputs) -> str:
    h_value, h_unit = inputs[HEIGHT]
    height_m = height_in_m(inputs[HEIGHT])
    if h_unit == "cm":
        h_line = (f"The patient's height is {number_text(h_value)} cm, which is {number_text(h_value)} cm * "
                  f"1 m / 100 cm = {_fmt(height_m, 4)} m.")
    elif h_unit == "in":
        h_line = (f"The patient's height is {number_text(h_value)} in, which is {number_text(h_value)} in * "
                  f"2.54 cm/in / 100 cm/m = {_fmt(height_m, 4)} m.")
    else:
        h_line = f"The patient's height is {number_text(h_value)} m."
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
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
        "a severe headache", "dizziness on standing", "chest discomfort", "blurred vision",
        "a fall at home", "palpitations", "fever and chills", "generalized weakness",
    ])
    sbp, dbp = int(inputs[SBP][0]), int(inputs[DBP][0])
    sentences = []
    measures = distractors(rng, {"bp"})
    if rng.random() < 0.25:
        unit = rng.choice(MMHG)
        sentences.append(rng.choice([
            f"{cap_first(person.his)} systolic blood pressure was {sbp} {unit} and "
            f"{person.his} diastolic blood pressure was {dbp} {unit}.",
            f"The blood pressure measured {sbp} {unit} systolic and {dbp} {unit} diastolic.",
        ]))
    else:
        measures.append(Measure("vitals", rng.choice(["blood pressure", "BP"]),
                                bp_text(rng, sbp, dbp)))
    return compose_note(rng, person, intro, measures, sentences)


def _explain_map(inputs: Inputs) -> str:
    sbp, dbp = number_text(inputs[SBP][0]), number_text(inputs[DBP][0])
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
    sex = random_sex(rng)
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
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
        "a urinary tract infection requiring antibiotic dosing", "worsening leg swelling",
        "nausea and decreased oral intake", "community-acquired pneumonia",
        "a planned contrast CT scan", "cellulitis of the lower leg", "poorly controlled diabetes",
    ])
    measures, sentences = body_measures(rng, person, inputs, [WEIGHT])
    value, unit = inputs[CREATININE]
    unit_text = unit if unit == "mg/dL" else rng.choice(["µmol/L", "umol/L", "micromol/L"])
    label = rng.choice(["creatinine", "serum creatinine", "plasma creatinine"])
    measures.append(Measure("labs", label,
                            f"{number_text(value)} {unit_text}"))
    measures += distractors(rng, {"cr", "weight"})
    return compose_note(rng, person, intro, measures, sentences)


def _explain_crcl(inputs: Inputs) -> str:
    age = number_text(inputs[AGE][0])
    female = inputs[SEX] == "Female"
    factor = 0.85 if female else 1.0
    w_line, kg = _weight_lines(inputs[WEIGHT])
    cr_value, cr_unit = inputs[CREATININE]
    cr = creatinine_in_mg_dl(inputs[CREATININE])
    if cr_unit == "mg/dL":
        cr_line = f"The concentration of creatinine is {number_text(cr_value)} mg/dL."
    else:
        cr_line = (f"The concentration of creatinine is {number_text(cr_value)} µmol/L. Dividing by "
                   f"{CREATININE_UMOL_PER_MG_DL} (µmol/L per mg/dL), this is {number_text(cr_value)} / "
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
        f"coefficient is {number_text(factor)}.",
        f"The patient is {age} years old.",
        w_line,
        cr_line,
        f"Plugging the patient's values gives us ((140 - {age}) * {_fmt(kg)} * {number_text(factor)}) / "
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
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
        "vomiting and abdominal pain", "confusion and rapid breathing",
        "polyuria and polydipsia", "profound weakness", "an intentional ingestion",
        "diarrhea for five days", "decreased urine output",
    ])
    labels = {
        SODIUM: ("sodium", "serum sodium", "Na"),
        CHLORIDE: ("chloride", "serum chloride", "Cl"),
        BICARBONATE: ("bicarbonate", "serum bicarbonate", "HCO3-"),
    }
    measures = [Measure("labs", rng.choice(labels[k]), f"{number_text(inputs[k][0])} {inputs[k][1]}")
                for k in (SODIUM, CHLORIDE, BICARBONATE)]
    measures += distractors(rng, {"na"}, 2, 4)
    return compose_note(rng, person, intro, measures)


def _explain_anion_gap(inputs: Inputs) -> str:
    lines = ["The formula for computing a patient's anion gap is: sodium (mEq/L) - (chloride "
             "(mEq/L) + bicarbonate (mEq/L))."]
    for key, name in ((SODIUM, "sodium"), (CHLORIDE, "chloride"), (BICARBONATE, "bicarbonate")):
        value, unit = number_text(inputs[key][0]), inputs[key][1]
        if unit == "mEq/L":
            lines.append(f"The concentration of {name} is {value} mEq/L.")
        else:
            lines.append(f"The concentration of {name} is {value} mmol/L. Because {name} has a "
                         f"valence of 1, 1 mmol = 1 mEq, so this is {value} mEq/L.")
    na, cl, hco3 = (number_text(inputs[k][0]) for k in (SODIUM, CHLORIDE, BICARBONATE))
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
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
        "perioral tingling and muscle cramps", "weight loss and poor appetite",
        "generalized edema", "fatigue and constipation", "a hip fracture after a fall",
        "worsening ascites", "chronic diarrhea",
    ])
    ca, alb = inputs[CALCIUM], inputs[ALBUMIN]
    measures = [
        Measure("labs", rng.choice(["calcium", "serum calcium", "total calcium"]),
                f"{number_text(ca[0])} {ca[1]}"),
        Measure("labs", rng.choice(["albumin", "serum albumin"]), f"{number_text(alb[0])} {alb[1]}"),
    ]
    measures += distractors(rng, {"alb"}, 1, 4)
    return compose_note(rng, person, intro, measures)


def _explain_calcium(inputs: Inputs) -> str:
    ca_value, ca_unit = inputs[CALCIUM]
    alb_value, alb_unit = inputs[ALBUMIN]
    ca, alb = calcium_in_mg_dl(inputs[CALCIUM]), albumin_in_g_dl(inputs[ALBUMIN])
    if ca_unit == "mg/dL":
        ca_line = f"The concentration of calcium is {number_text(ca_value)} mg/dL."
    else:
        ca_line = (f"The concentration of calcium is {number_text(ca_value)} mmol/L. Calcium has a molar "
                   f"mass of 40.08 g/mol, so this is {number_text(ca_value)} * 4.008 = "
                   f"{_fmt(ca, 4)} mg/dL.")
    if alb_unit == "g/dL":
        alb_line = f"The concentration of albumin is {number_text(alb_value)} g/dL."
    else:
        alb_line = (f"The concentration of albumin is {number_text(alb_value)} g/L, which is "
                    f"{number_text(alb_value)} / 10 = {_fmt(alb, 4)} g/dL.")
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
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
        "palpitations", "an episode of syncope", "lightheadedness after starting a new antibiotic",
        "chest pain", "near-fainting while standing", "vomiting and poor oral intake",
    ])
    hr, qt = int(inputs[HEART_RATE][0]), int(inputs[QT][0])
    ms = rng.choice(["ms", "msec", "milliseconds"])
    bpm = rng.choice(BPM)
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
        measures.append(Measure("ecg", "QT interval", f"{qt} {ms}"))
        label = rng.choice(["heart rate", "ventricular rate"])
        measures.append(Measure(rng.choice(["ecg", "vitals"]), label, f"{hr} {bpm}"))
    measures += distractors(rng, {"hr"})
    if rng.random() < 0.5:
        sentences.append(rng.choice([
            "The PR interval was 160 ms and the QRS duration was 92 ms.",
            "There were no acute ST-segment changes.",
            "The QRS duration was 88 ms with a normal axis.",
        ]))
    return compose_note(rng, person, intro, measures, sentences)


def _explain_qtc(inputs: Inputs) -> str:
    hr, qt = number_text(inputs[HEART_RATE][0]), number_text(inputs[QT][0])
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
    inputs: Inputs = {SEX: random_sex(rng), AGE: [age, "years"]}
    probabilities = {CHF: 0.3, HTN: 0.55, DM: 0.35, STROKE: 0.15, TIA: 0.12, THROMBO: 0.08,
                     VASCULAR: 0.3}
    for key in _CHA_ORDER:
        inputs[key] = rng.random() < probabilities[key]
    return inputs


def _note_cha(inputs: Inputs, rng: random.Random) -> str:
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
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
    present += rng.sample(OTHER_HISTORY, rng.randint(0, 2))
    sentences = history_sentences(rng, person, present, absent)
    measures = distractors(rng, {"bp", "glucose"}, 1, 3)
    return compose_note(rng, person, intro, measures, sentences)


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
    lines.append(f"Based on the patient note, the history of {join_words(flags)}. {verdict}")
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
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
        "three days of productive cough and fever", "fever, chills and pleuritic chest pain",
        "worsening shortness of breath and a cough", "cough with rusty sputum",
        "fever and right-sided chest pain", "lethargy and cough",
    ])
    he, his = person.he, person.his
    if inputs[CONFUSION]:
        confusion = rng.choice([
            f"{cap_first(he)} was confused and disoriented to time and place.",
            f"On examination {he} was newly confused.",
            f"{cap_first(his)} family reported new-onset confusion.",
            f"{cap_first(he)} appeared disoriented and could not state the date.",
        ])
    else:
        confusion = rng.choice([
            f"{cap_first(he)} was alert and oriented to person, place, and time.",
            f"{cap_first(he)} was awake, alert, and fully oriented.",
            "There was no confusion.",
            f"Mental status was normal and {he} was not confused.",
        ])
    sbp, dbp = int(inputs[SBP][0]), int(inputs[DBP][0])
    measures = [
        Measure("vitals", rng.choice(["blood pressure", "BP"]), bp_text(rng, sbp, dbp)),
        Measure("vitals", rng.choice(["respiratory rate", "respiration rate"]),
                value_text(rng, inputs[RESP_RATE][0], BREATHS)),
        Measure("labs", rng.choice(["BUN", "blood urea nitrogen", "serum urea nitrogen"]),
                f"{number_text(inputs[BUN][0])} mg/dL"),
    ]
    measures += distractors(rng, {"bp", "rr", "bun"}, 1, 4)
    xray = rng.choice([
        "Chest radiography showed a right lower lobe consolidation.",
        "A chest X-ray revealed left lower lobe infiltrates.",
        "Chest imaging demonstrated multilobar opacities.",
    ])
    return compose_note(rng, person, intro, measures, [confusion, xray])


def _explain_curb(inputs: Inputs) -> str:
    age = number_text(inputs[AGE][0])
    bun, rr = number_text(inputs[BUN][0]), number_text(inputs[RESP_RATE][0])
    sbp, dbp = number_text(inputs[SBP][0]), number_text(inputs[DBP][0])
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


def _wells_sentence(rng: random.Random, person: Person, key: str, present: bool) -> str:
    """A sentence stating (or denying) one Wells' criterion."""
    surgeries = ["a total knee replacement", "a hip replacement", "a laparoscopic cholecystectomy",
                 "an abdominal hysterectomy" if person.female else "an inguinal hernia repair"]
    cancers = ["colon cancer", "lung cancer", "pancreatic cancer", "lymphoma",
               "breast cancer" if person.female else "prostate cancer"]
    return rng.choice(_WELLS_TEXT[(key, present)]).format(
        He=cap_first(person.he), His=cap_first(person.his), side=rng.choice(["left", "right"]),
        Alternative=cap_first(rng.choice(_ALTERNATIVES)), days=rng.randint(3, 14),
        surgery=rng.choice(surgeries), weeks=rng.choice(["one week", "two weeks", "three weeks"]),
        surgery_days=rng.randint(5, 25), years=rng.randint(2, 30), months=rng.randint(1, 5),
        cancer=rng.choice(cancers),
    )


def _note_wells(inputs: Inputs, rng: random.Random) -> str:
    person = patient(inputs, rng)
    intro = intro_sentence(rng, person, [
        "sudden-onset shortness of breath", "pleuritic chest pain", "dyspnea and chest tightness",
        "acute shortness of breath and lightheadedness", "chest pain worse with deep breathing",
    ])
    sentences = [_wells_sentence(rng, person, key, bool(inputs[key])) for key in _WELLS_FLAGS]
    measures = [Measure("vitals", rng.choice(["heart rate", "pulse"]),
                        value_text(rng, inputs[HEART_RATE][0], BPM))]
    measures += distractors(rng, {"hr"}, 1, 4)
    return compose_note(rng, person, intro, measures, sentences, closing=False)


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
    hr = number_text(inputs[HEART_RATE][0])
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
    person = Person(rng.randint(17, 44), "Female")
    lmp = parse_date(inputs[LMP])
    shown = inputs[LMP] if rng.random() < 0.75 else _long_date(lmp)
    cycle = inputs[CYCLE]
    gravida = rng.randint(1, 5)
    para = rng.randint(0, gravida - 1)
    a, age = article_for(person.age), person.age
    intro = rng.choice([
        f"{cap_first(a)} {age}-year-old G{gravida}P{para} woman presents for her first prenatal visit.",
        f"{cap_first(a)} {age}-year-old woman comes to the clinic after a positive pregnancy test.",
        f"The patient is {a} {age}-year-old woman seen for nausea and a missed period.",
        f"{cap_first(a)} {age} year old woman, gravida {gravida} para {para}, is evaluated for "
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
    measures = distractors(rng, unrelated, 0, 2)
    return compose_note(rng, person, intro, measures, sentences, social=False, closing=False)


def _explain_due(inputs: Inputs) -> str:
    lmp = parse_date(inputs[LMP])
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

COLUMNS = (  # MedCalc-Bench's, in its order
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
