"""Domains: each file is one task (reader, prompt, target, scorer)."""

from talr.tasks.base import DataError, Task, Verdict
from talr.tasks.medcalc import MedCalc

__all__ = ["DataError", "MedCalc", "Task", "Verdict"]
