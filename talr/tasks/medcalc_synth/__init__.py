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
The formulas (`bmi`, `mean_arterial_pressure`, ...) are functions of that object, so they can
be called directly.

The package: `formulas` (the pure calculators, units and constants), `prose` (clinical wording
shared by the notes: intros, measured and distractor findings, history sentences) and
`calculators` (each calculator's input sampler, note, explanation and spec; `generate_rows`).
Only the standard library is used; all randomness comes from a local `random.Random(seed)`, and
the rows for a seed do not change between versions unless a calculator's text or formula does.
"""

from talr.tasks.medcalc_synth.calculators import CALCULATORS, generate_rows
from talr.tasks.medcalc_synth.formulas import (
    anion_gap,
    bmi,
    cha2ds2_vasc,
    corrected_calcium,
    creatinine_clearance,
    curb_65,
    due_date,
    mean_arterial_pressure,
    qtc_bazett,
    wells_pe,
)
from talr.tasks.medcalc_synth.prose import format_decimal

__all__ = [
    "CALCULATORS",
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
