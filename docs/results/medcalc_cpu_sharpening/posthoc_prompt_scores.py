"""Prompt scores of a finished run that predates them: its best checkpoint scores the initial model's
stored answers (forgetting/responses.jsonl), summed per prompt as ForgettingMonitor writes them during
fit (callbacks.forgetting_monitor.prompt_sums). Used for the sharpening rerun in docs/results.md.

    python docs/results/medcalc_cpu_sharpening/posthoc_prompt_scores.py SWEEP_DIR RUN OUT.jsonl
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import torch

from callbacks.forgetting_monitor import prompt_sums
from talr.data import Example
from talr.models import TokenNLLModel, load_model, load_tokenizer
from talr.scoring import score_examples
from talr.token_loss import IGNORE_INDEX


def main(sweep: str, run: str, out: str, model: str = "smollm2-135m-instruct") -> None:
    log_dir = Path(sweep) / run / "medcalc_cpu" / "version_0"
    responses = [json.loads(line) for line in (log_dir / "forgetting" / "responses.jsonl").read_text().splitlines()]
    (checkpoint,) = glob.glob(str(log_dir / "checkpoints" / "best-*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    lm = load_model(model)
    lm.load_state_dict({k.removeprefix("net.lm."): v for k, v in state.items() if k.startswith("net.lm.")})
    examples = [Example(row_index=i, input_ids=r["prompt_ids"] + r["response_ids"], prompt_len=len(r["prompt_ids"]),
                        labels=[IGNORE_INDEX] * len(r["prompt_ids"]) + r["response_ids"]) for i, r in enumerate(responses)]
    scores = score_examples(TokenNLLModel(lm).eval(), examples, load_tokenizer(model).pad_token_id, 16, "cpu",
                            statistics=True)
    Path(out).write_text("".join(json.dumps(p) + "\n" for p in prompt_sums(list(zip(responses, scores)))))


if __name__ == "__main__":
    main(*sys.argv[1:4])
