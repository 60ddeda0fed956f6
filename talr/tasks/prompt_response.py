"""PromptResponse: any table of prompt / response pairs (JSONL, JSON, CSV or Parquet) as a task.

Meant for general data to replay (`data.replay.task`), so it asks for nothing but the two columns;
the prompt is one user turn and the response the supervised target. Its scorer, for use as a
domain task, is an exact match after stripping whitespace.
"""

from __future__ import annotations

from pathlib import Path

from talr.tasks.base import DataError, Message, Row, Task, Verdict, read_records


class PromptResponse(Task):
    """Rows of a file with a prompt column and a response column.

    Args:
        source: the file (.jsonl, .json, .csv or .parquet).
        prompt_key: the column holding the user's prompt.
        response_key: the column holding the answer to train on.
        system: an optional system message before every prompt.
    """

    name = "prompt_response"

    def __init__(self, source: str, prompt_key: str = "prompt", response_key: str = "response",
                 system: str | None = None) -> None:
        self.source = source
        self.prompt_key = prompt_key
        self.response_key = response_key
        self.system = system

    def read(self) -> list[Row]:
        path = Path(self.source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
        rows = read_records(path)
        if not rows:
            raise DataError(f"{path}: no rows")
        missing = [key for key in (self.prompt_key, self.response_key) if key not in rows[0]]
        if missing:
            raise DataError(f"{path}: missing required column(s): {', '.join(missing)}")
        for number, row in enumerate(rows, start=1):
            for key in (self.prompt_key, self.response_key):
                if not str(row.get(key) or "").strip():
                    raise DataError(f"{path} row {number}, column {key!r}: empty")
        return [{"prompt": str(row[self.prompt_key]), "response": str(row[self.response_key])} for row in rows]

    def prompt_messages(self, row: Row) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": row["prompt"]}]

    def target(self, row: Row) -> str:
        return row["response"]

    def score(self, generation: str, row: Row) -> Verdict:
        answer = generation.strip()
        return Verdict(correct=answer == row["response"].strip(), parsed=bool(answer), answer=answer)
