"""A small built-in set of general-purpose prompts, for measuring forgetting without external data.

`callbacks.forgetting_monitor.ForgettingMonitor` samples the initial model's answers to these
prompts before fine-tuning and tracks how much less likely the model finds those answers as it
trains. The prompts are short and varied on purpose: five categories (math, code, instructions,
facts, writing) of general skills that domain SFT should not erode. A user file can replace them
(`load_prompts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ("math", "code", "instructions", "facts", "writing")


@dataclass(frozen=True)
class GeneralPrompt:
    category: str
    text: str


def _prompts(category: str, texts: list[str]) -> list[GeneralPrompt]:
    return [GeneralPrompt(category, text) for text in texts]


GENERAL_PROMPTS: tuple[GeneralPrompt, ...] = tuple(
    _prompts("math", [
        "What is 17 multiplied by 23?",
        "A shirt costs $40 and is on sale for 25% off. What is the sale price?",
        "Solve for x: 3x + 7 = 22.",
        "What is the sum of the interior angles of a hexagon?",
        "A train travels 180 km in 2.5 hours. What is its average speed in km/h?",
        "Is 91 a prime number? Explain briefly.",
        "Simplify the fraction 84/126.",
        "What is the derivative of x^3 + 2x?",
        "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many are left?",
        "Convert 0.375 to a fraction in lowest terms.",
        "What is the probability of rolling two sixes with two fair dice?",
    ])
    + _prompts("code", [
        "Write a Python function that returns the factorial of n.",
        "Write a Python function that checks whether a string is a palindrome.",
        "What does the SQL statement SELECT COUNT(*) FROM users; return?",
        "Explain the difference between a list and a tuple in Python.",
        "Write a JavaScript function that reverses an array without using reverse().",
        "What is the time complexity of binary search, and why?",
        "Write a bash command that counts the lines in every .txt file in a folder.",
        "Fix the bug: def add(a, b): return a - b",
        "Write a Python list comprehension for the squares of the even numbers below 20.",
        "What does the git command 'git stash' do?",
        "Write a regular expression that matches a five-digit US ZIP code.",
    ])
    + _prompts("instructions", [
        "List three tips for getting better sleep, as bullet points.",
        "Answer in exactly one word: what color is the sky on a clear day?",
        "Rewrite this sentence in the passive voice: The cat chased the mouse.",
        "Give me a numbered list of four steps to boil an egg.",
        "Reply in all capital letters: what is your favorite season and why?",
        "Summarize the plot of Cinderella in two sentences.",
        "Translate 'Where is the train station?' into French.",
        "Write the days of the week in reverse order, separated by commas.",
        "Explain photosynthesis to a five-year-old in under 50 words.",
        "Give three synonyms for 'happy' and nothing else.",
        "Respond with a JSON object with keys 'name' and 'age' for a fictional person.",
    ])
    + _prompts("facts", [
        "What is the capital of Australia?",
        "Who wrote the novel Pride and Prejudice?",
        "What is the chemical symbol for gold?",
        "How many planets are in the Solar System?",
        "In which year did the first human land on the Moon?",
        "What is the largest ocean on Earth?",
        "What gas do plants absorb from the air for photosynthesis?",
        "Who painted the Mona Lisa?",
        "What is the boiling point of water at sea level in degrees Celsius?",
        "Which organ in the human body pumps blood?",
        "What is the longest river in South America?",
    ])
    + _prompts("writing", [
        "Write a haiku about autumn leaves.",
        "Write a short, polite email declining a meeting invitation.",
        "Write the opening sentence of a mystery novel.",
        "Describe a busy city market in three sentences.",
        "Write a four-line poem about the sea.",
        "Write a short product description for a reusable water bottle.",
        "Write a thank-you note to a teacher.",
        "Give a one-paragraph argument for why people should read more books.",
        "Write a limerick about a cat who loves to cook.",
        "Write a two-sentence horror story.",
        "Write a friendly tweet announcing a new bakery opening.",
    ])
)


def load_prompts(path: str | Path) -> list[GeneralPrompt]:
    """Prompts from a user file: JSONL with `prompt` (and optional `category`) per line, or plain
    text with one prompt per line (category `custom`). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or not str(record.get("prompt", "")).strip():
                raise ValueError(f"{path}:{number}: each line needs a non-empty 'prompt'")
            prompts.append(GeneralPrompt(str(record.get("category", "custom")), str(record["prompt"]).strip()))
        else:
            prompts.append(GeneralPrompt("custom", line))
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


def prompt_scores_file(dirpath: str | Path, step: int | str) -> Path:
    """Where ForgettingMonitor puts a validation's per-prompt drift sums on these prompts (its `dirpath`,
    default `<log_dir>/forgetting`); talr.experiments.significance reads them from there. `step` is a
    validation's step, or the tag of other weights scored at fit end (a WiSE-FT alpha: `wiseft_alpha0.50`)."""
    name = step if isinstance(step, str) else f"step{int(step):06d}"
    return Path(dirpath) / "prompt_scores" / f"{name}.jsonl"
