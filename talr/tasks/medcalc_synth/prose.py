"""Clinical prose shared by the calculators' notes: numbers as a note writes them, the patient,
intro sentences, measured findings and how they are listed, distractor findings that no formula
uses, history sentences, and the assembly of one note. Every random choice comes from the `rng`
passed in, in a fixed order: the generated rows depend on that order."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from talr.tasks.medcalc_synth.formulas import AGE, HEIGHT, SEX, WEIGHT

# ===================================================================== number formatting


def format_decimal(value: float, places: int = 3) -> str:
    """`value` rounded to `places` decimals without trailing zeros: 25.2380 -> '25.238'."""
    text = f"{value:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def number_text(value: float | int) -> str:
    """An input number as the note shows it: 72.0 -> '72', 1.40 -> '1.4'."""
    value = float(value)
    if value.is_integer():
        return str(int(value))
    return repr(round(value, 6))


# ===================================================================== note building blocks


def cap_first(text: str) -> str:
    """The first letter upper-cased, the rest untouched (str.capitalize would lower 'ECG')."""
    return text[:1].upper() + text[1:]


def join_words(items: Sequence[str], conj: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} {conj} {items[1]}"
    return f"{', '.join(items[:-1])}, {conj} {items[-1]}"


@dataclass(frozen=True)
class Person:
    """The patient of a note, with the pronouns the prose needs."""

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


def random_sex(rng: random.Random) -> str:
    return rng.choice(["Male", "Female"])


def patient(inputs: Mapping[str, Any], rng: random.Random,
            ages: tuple[int, int] = (19, 88)) -> Person:
    """The patient of a note: age and sex from the inputs when they are inputs, else random."""
    age = int(inputs[AGE][0]) if AGE in inputs else rng.randint(*ages)
    sex = inputs[SEX] if SEX in inputs else random_sex(rng)
    return Person(age, sex)


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


def article_for(number: int) -> str:
    """The indefinite article before a spoken number: 'an 18-year-old', 'a 67-year-old'."""
    return "an" if str(number).startswith("8") or number in (11, 18) else "a"


def intro_sentence(rng: random.Random, person: Person, complaints: Sequence[str],
                   settings: Sequence[str] = _SETTINGS) -> str:
    setting = rng.choice(settings)
    article = article_for(person.age)
    return rng.choice(_INTRO_TEMPLATES).format(
        a=article, A=cap_first(article), age=person.age, noun=person.noun(rng),
        setting=setting, Setting=cap_first(setting),
        complaint=rng.choice(complaints),
    )


@dataclass(frozen=True)
class Measure:
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


def _render_measures(rng: random.Random, person: Person,
                     measures: Sequence[Measure]) -> list[str]:
    """Sentences for the measured findings: per group either one list or one sentence each."""
    groups: dict[str, list[Measure]] = {}
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
            head = rng.choice(_LIST_VERB[group]).replace("Her ", cap_first(person.his) + " ")
            sentences.append(f"{head} {join_words([f'{m.label} of {m.value}' for m in items])}.")
        else:
            for m in items:
                sentences.append(rng.choice([
                    f"{cap_first(person.his)} {m.label} was {m.value}.",
                    f"{cap_first(m.label)} was {m.value}.",
                    f"{cap_first(m.label)} measured {m.value}.",
                    f"{cap_first(_indefinite(m.label))} {m.label} of {m.value} was recorded.",
                ]))
    return sentences


# Unit wordings.
MMHG = ("mmHg", "mm Hg")
BPM = ("beats per minute", "bpm", "beats/min")
BREATHS = ("breaths per minute", "breaths/min", "/min")


def with_unit(number: float | int, unit: str) -> str:
    """'72 bpm'; a unit that starts with '/' or '%' follows the number directly: '18/min', '95% on room air'."""
    return f"{number_text(number)}{unit}" if unit.startswith(("/", "%")) else f"{number_text(number)} {unit}"


def value_text(rng: random.Random, number: float | int, units: Sequence[str]) -> str:
    """The number with one of `units`, drawn from `rng`."""
    return with_unit(number, rng.choice(units))


def bp_text(rng: random.Random, sbp: int, dbp: int) -> str:
    return rng.choice([f"{sbp}/{dbp} {rng.choice(MMHG)}", f"{sbp}/{dbp}",
                       f"{sbp} over {dbp} {rng.choice(MMHG)}"])


# ===================================================================== distractors
# Measured findings that no formula here uses. A `_Finding` row draws, in this order, its label
# (only when it has several), its number, then its unit (only when it has several); temperature
# and blood pressure do not fit that pattern and stay functions. The dict's order is the order
# `distractors` samples tags from: all of it is part of the rows' random sequence.
@dataclass(frozen=True)
class _Finding:
    """A distractor drawn from ranges: label, number in [low, high], unit."""

    group: str
    labels: tuple[str, ...]
    low: int | float
    high: int | float
    units: tuple[str, ...]
    decimals: int | None = None  # None: a whole number (randint), else uniform(low, high) rounded

    def draw(self, rng: random.Random) -> Measure:
        label = rng.choice(self.labels) if len(self.labels) > 1 else self.labels[0]
        if self.decimals is None:
            number: float | int = rng.randint(self.low, self.high)
        else:
            number = round(rng.uniform(self.low, self.high), self.decimals)
        unit = rng.choice(self.units) if len(self.units) > 1 else self.units[0]
        return Measure(self.group, label, with_unit(number, unit))


def _temperature(rng: random.Random) -> Measure:
    """Drawn number first, then °F (30%) or a Celsius wording."""
    celsius = round(rng.uniform(36.0, 39.6), 1)
    if rng.random() < 0.3:
        return Measure("vitals", "temperature", f"{number_text(round(celsius * 9 / 5 + 32, 1))} °F")
    return Measure("vitals", rng.choice(["temperature", "body temperature"]),
                   f"{number_text(celsius)} {rng.choice(['°C', 'degrees Celsius'])}")


def _blood_pressure(rng: random.Random) -> Measure:
    sbp = rng.randint(100, 165)
    dbp = rng.randint(55, min(sbp - 25, 100))
    return Measure("vitals", "blood pressure", bp_text(rng, sbp, dbp))


_SPO2_UNITS = ("% on room air", "% on ambient air", "% on 2 L nasal cannula")
_PER_LITRE = ("mmol/L", "mEq/L")
_DISTRACTORS: dict[str, Callable[[random.Random], Measure]] = {
    "temp": _temperature,
    "hr": _Finding("vitals", ("heart rate", "pulse"), 58, 118, BPM).draw,
    "rr": _Finding("vitals", ("respiratory rate",), 12, 26, BREATHS).draw,
    "bp": _blood_pressure,
    "spo2": _Finding("vitals", ("oxygen saturation", "SpO2"), 88, 100, _SPO2_UNITS).draw,
    "hgb": _Finding("labs", ("hemoglobin",), 8.5, 16.5, ("g/dL",), decimals=1).draw,
    "wbc": _Finding("labs", ("white blood cell count", "WBC count", "leukocyte count"), 3.5, 19.0, ("× 10^9/L",),
                    decimals=1).draw,
    "plt": _Finding("labs", ("platelet count",), 110, 420, ("× 10^9/L",)).draw,
    "glucose": _Finding("labs", ("glucose", "serum glucose", "blood glucose"), 72, 160, ("mg/dL",)).draw,
    "k": _Finding("labs", ("potassium", "serum potassium"), 3.2, 5.4, _PER_LITRE, decimals=1).draw,
    "na": _Finding("labs", ("sodium",), 132, 146, _PER_LITRE).draw,
    "bun": _Finding("labs", ("BUN", "blood urea nitrogen"), 8, 30, ("mg/dL",)).draw,
    "cr": _Finding("labs", ("creatinine",), 0.6, 1.6, ("mg/dL",), decimals=2).draw,
    "alb": _Finding("labs", ("albumin",), 2.8, 4.8, ("g/dL",), decimals=1).draw,
    "ast": _Finding("labs", ("AST", "aspartate aminotransferase"), 14, 90, ("U/L",)).draw,
    "lactate": _Finding("labs", ("lactate",), 0.6, 3.8, ("mmol/L",), decimals=1).draw,
    "height": _Finding("body", ("height",), 150, 192, ("cm",)).draw,
    "weight": _Finding("body", ("weight",), 48, 110, ("kg",), decimals=1).draw,
}

# ===================================================================== assembling a note

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
OTHER_HISTORY = (
    "hyperlipidemia", "hypothyroidism", "gastroesophageal reflux disease", "osteoarthritis",
    "depression", "gout", "benign prostatic hyperplasia", "migraine", "glaucoma", "asthma",
)
_CLOSINGS = (
    "{He} was admitted for further management.",
    "Further workup was initiated.",
    "{He} was monitored closely while awaiting further results.",
    "Treatment was started and {he} was observed overnight.",
)


def _fill(template: str, person: Person) -> str:
    return template.format(he=person.he, his=person.his, him=person.him,
                           He=cap_first(person.he), His=cap_first(person.his), Him=cap_first(person.him))


def distractors(rng: random.Random, exclude: set[str], low: int = 1,
                high: int = 4) -> list[Measure]:
    """Between `low` and `high` unrelated findings, none of the excluded kinds."""
    tags = [tag for tag in _DISTRACTORS if tag not in exclude]
    chosen = rng.sample(tags, rng.randint(low, high))
    return [_DISTRACTORS[tag](rng) for tag in chosen]


def compose_note(rng: random.Random, person: Person, intro: str, measures: Sequence[Measure],
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


def history_sentences(rng: random.Random, person: Person, present: Sequence[str],
                      absent: Sequence[str]) -> list[str]:
    """Sentences stating the present conditions and explicitly denying the absent ones."""
    present, absent = list(present), list(absent)
    rng.shuffle(present)
    rng.shuffle(absent)
    out = []
    if present:
        out.append(rng.choice([
            f"{cap_first(person.his)} past medical history is significant for {join_words(present)}.",
            f"{cap_first(person.he)} has a history of {join_words(present)}.",
            f"Medical history includes {join_words(present)}.",
            f"Past medical history: {join_words(present)}.",
        ]))
    # Denials: one sentence, or two when there are several.
    chunks = [absent] if len(absent) < 3 or rng.random() < 0.5 else [absent[:2], absent[2:]]
    for chunk in chunks:
        if not chunk:
            continue
        out.append(rng.choice([
            f"{cap_first(person.he)} has no history of {join_words(chunk, 'or')}.",
            f"{cap_first(person.he)} denies any history of {join_words(chunk, 'or')}.",
            f"There is no known history of {join_words(chunk, 'or')}.",
            f"{cap_first(person.his)} history is negative for {join_words(chunk, 'or')}.",
        ]))
    return out


_HEIGHT_WORDS = {"cm": ("cm", "centimeters"), "m": ("m", "meters"), "in": ("in", "inches")}
_WEIGHT_WORDS = {"kg": ("kg", "kilograms"), "lb": ("lb", "lbs", "pounds")}


def body_measures(rng: random.Random, person: Person, inputs: Mapping[str, Any],
                  keys: Sequence[str]) -> tuple[list[Measure], list[str]]:
    """Height and/or weight as measured findings or as one free sentence."""
    texts = {}
    if HEIGHT in keys:
        value, unit = inputs[HEIGHT]
        texts[HEIGHT] = f"{number_text(value)} {rng.choice(_HEIGHT_WORDS[unit])}"
    if WEIGHT in keys:
        value, unit = inputs[WEIGHT]
        texts[WEIGHT] = f"{number_text(value)} {rng.choice(_WEIGHT_WORDS[unit])}"
    if len(texts) == 2 and rng.random() < 0.5:
        h, w = texts[HEIGHT], texts[WEIGHT]
        return [], [rng.choice([
            f"{cap_first(person.he)} is {h} tall and weighs {w}.",
            f"{cap_first(person.his)} height is {h} and {person.his} weight is {w}.",
            f"On examination, {person.he} weighed {w} with a height of {h}.",
        ])]
    if len(texts) == 1 and rng.random() < 0.4:
        (key, text), = texts.items()
        sentence = (f"{cap_first(person.he)} weighs {text}." if key == WEIGHT
                    else f"{cap_first(person.he)} is {text} tall.")
        return [], [sentence]
    labels = {HEIGHT: ("height",), WEIGHT: ("weight", "body weight")}
    return [Measure("body", rng.choice(labels[k]), t) for k, t in texts.items()], []
