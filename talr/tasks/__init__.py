"""Domains: each file is one task (reader, prompt, target, scorer)."""

from talr.tasks.base import DataError, Task, Verdict
from talr.tasks.esci import ESCI
from talr.tasks.math import GSM8K, MetaMathQA
from talr.tasks.medcalc import MedCalc
from talr.tasks.prompt_response import PromptResponse

__all__ = ["DataError", "ESCI", "GSM8K", "MedCalc", "MetaMathQA", "PromptResponse", "Task", "Verdict"]
