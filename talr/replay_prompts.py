"""Built-in general prompts for replay (`data.replay` without a task): the initial model answers
them once before training, and those answers are mixed into the training steps.

The same five categories as the forgetting monitor's prompts (talr/general_prompts.py), with other
texts on purpose: replay trains on these answers, the monitor measures drift on its own; were they
the same prompts, the monitor would report how well replay memorised its answers, not forgetting
(`tests/test_replay.py` checks the two sets share no prompt).
"""

from __future__ import annotations

from talr.general_prompts import GeneralPrompt

_TEXTS: dict[str, list[str]] = {
    "math": [
        "What is 48 divided by 6, plus 15?",
        "A recipe needs 3 eggs per cake. How many eggs are needed for 7 cakes?",
        "Solve for y: 5y - 9 = 31.",
        "What is the area of a circle with radius 4? Use pi = 3.14.",
        "A car uses 6 liters of fuel per 100 km. How much fuel does it need for 250 km?",
        "What is 15% of 260?",
        "Find the least common multiple of 12 and 18.",
        "What is the integral of 2x with respect to x?",
        "Is 121 a perfect square? Explain briefly.",
        "Round 7.4862 to two decimal places.",
        "A bag holds 4 red and 6 blue marbles. What is the chance of drawing a red one?",
    ],
    "code": [
        "Write a Python function that returns the largest number in a list.",
        "Write a Python function that counts the vowels in a string.",
        "What does the SQL clause GROUP BY do?",
        "Explain the difference between a dictionary and a set in Python.",
        "Write a JavaScript function that returns the sum of an array of numbers.",
        "What is the time complexity of inserting into a Python dict, on average?",
        "Write a shell command that prints the ten largest files in the current folder.",
        "Fix the bug: def is_even(n): return n % 2 == 1",
        "Write a Python generator that yields the first n Fibonacci numbers.",
        "What does the git command 'git rebase' do, in one paragraph?",
        "Write a regular expression that matches a date written as YYYY-MM-DD.",
    ],
    "instructions": [
        "List three ways to save water at home, as bullet points.",
        "Answer with a single number: how many legs does a spider have?",
        "Rewrite this sentence in the future tense: She walks to school.",
        "Give me a numbered list of five steps to plant a tree.",
        "Reply in lowercase only: what do you like about rainy days?",
        "Summarize the story of Little Red Riding Hood in two sentences.",
        "Translate 'Good morning, how are you?' into Spanish.",
        "Write the months of the year that have 31 days, separated by semicolons.",
        "Explain what gravity is to a seven-year-old in under 40 words.",
        "Give three antonyms for 'fast' and nothing else.",
        "Respond with a JSON list of three fruit names.",
    ],
    "facts": [
        "What is the capital of Canada?",
        "Who wrote the play Romeo and Juliet?",
        "What is the chemical symbol for sodium?",
        "How many continents are there on Earth?",
        "In which year did World War II end?",
        "What is the highest mountain in the world?",
        "What is the main gas in the air we breathe?",
        "Who developed the theory of relativity?",
        "At what temperature in degrees Celsius does water freeze?",
        "Which planet is closest to the Sun?",
        "What is the largest desert in Africa?",
    ],
    "writing": [
        "Write a haiku about a winter morning.",
        "Write a short email asking a colleague to review a document.",
        "Write the opening sentence of a science fiction story.",
        "Describe a quiet library in three sentences.",
        "Write a four-line poem about the moon.",
        "Write a short product description for a wooden desk lamp.",
        "Write a short birthday message for a friend.",
        "Give a one-paragraph argument for why cities should plant more trees.",
        "Write a limerick about a dog who loves to swim.",
        "Write a two-sentence story about a lost key.",
        "Write a friendly post announcing a new community garden.",
    ],
}

REPLAY_PROMPTS: tuple[GeneralPrompt, ...] = tuple(
    GeneralPrompt(category, text) for category, texts in _TEXTS.items() for text in texts
)
