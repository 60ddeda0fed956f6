"""HumanEval's lm-eval hooks: build the programs, then score pass@k through talr.code_sandbox.

lm-eval's own humaneval utilities score with HF evaluate's `code_eval`, which is fetched from the
hub when imported; these do the same job offline. The task is marked `unsafe_code`, so lm-eval
only calls `pass_at_k` when the run confirmed code execution.
"""

from __future__ import annotations

from talr.code_sandbox import estimate_pass_at_k, run_program


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Each completion appended to its prompt: the full function the tests call."""
    return [[doc["prompt"] + completion for completion in completions] for completions, doc in zip(resps, docs)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int, timeout_s: float = 3.0) -> dict[str, float]:
    """pass@k of one problem: lm-eval calls this per document with its test and its candidates."""
    ks = [k] if isinstance(k, int) else list(k)
    (test,), (candidates,) = references, predictions
    passed = sum(run_program(candidate + "\n" + test, timeout_s=timeout_s).passed for candidate in candidates)
    return {f"pass@{kk}": estimate_pass_at_k(len(candidates), passed, kk) for kk in ks}
