"""SFT encoding on real MedCalc rows with SmolLM2's real tokenizer and chat template."""

import pytest
import torch

from conftest import MEDCALC_CSV
from talr.data import LengthGroupedSampler, SFTDataModule, StepCollator, encode_example, turn_end_text
from talr.tasks import DataError, MedCalc
from talr.token_loss import IGNORE_INDEX


@pytest.fixture(scope="module")
def medcalc_rows():
    return MedCalc(source=str(MEDCALC_CSV)).read()


def test_only_the_assistant_target_and_end_of_turn_are_trained(tokenizer, medcalc_rows):
    task = MedCalc(source=str(MEDCALC_CSV))
    end = turn_end_text(tokenizer)
    assert end == "<|im_end|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, row in enumerate(medcalc_rows[:25]):
        ex = encode_example(tokenizer, task, row, i, max_length=100_000, overlength="truncate", end_text=end)
        trained = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
        prompt = [t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX]
        # the trained tokens decode to exactly the target plus the end-of-turn token
        assert tokenizer.decode(trained) == task.target(row) + "<|im_end|>"
        assert trained[-1] == im_end
        # the prompt holds system, user, the assistant header and the prefix: nothing of the target
        prompt_text = tokenizer.decode(prompt)
        assert prompt_text.endswith("<|im_start|>assistant\nLet me solve this step by step.\n<think>\n")
        assert row["Patient Note"].strip()[:200] in prompt_text
        assert row["Ground Truth Explanation"].strip()[:80] not in prompt_text
        # labels are the input ids wherever they are not masked (the model shifts them itself)
        assert all(label in (IGNORE_INDEX, t) for t, label in zip(ex.input_ids, ex.labels))
        # the whole sequence is exactly what the chat template renders for the conversation
        rendered = tokenizer.apply_chat_template(
            task.prompt_messages(row) + [{"role": "assistant", "content": task.assistant_prefix(row) + task.target(row)}],
            tokenize=False,
        )
        assert tokenizer.decode(ex.input_ids) == rendered.rstrip("\n")


def test_overlength_policies_truncate_the_target_tail_or_drop(tokenizer, medcalc_rows):
    task = MedCalc(source=str(MEDCALC_CSV))
    end = turn_end_text(tokenizer)
    row = medcalc_rows[0]
    full = encode_example(tokenizer, task, row, 0, 100_000, "truncate", end)
    limit = full.prompt_len + 10
    cut = encode_example(tokenizer, task, row, 0, limit, "truncate", end)
    assert cut.truncated and len(cut.input_ids) == limit and cut.num_targets == 10
    assert cut.input_ids == full.input_ids[:limit]
    assert encode_example(tokenizer, task, row, 0, limit, "drop", end) is None
    # a prompt that alone fills max_length cannot be truncated into anything: dropped either way
    assert encode_example(tokenizer, task, row, 0, full.prompt_len, "truncate", end) is None


def test_datamodule_counts_affected_rows_and_splits_deterministically(medcalc_rows, embedded_dir, caplog):
    def build(seed):
        dm = SFTDataModule(MedCalc(source=str(MEDCALC_CSV), limit=60), tokenizer=str(embedded_dir),
                           max_length=900, val_size=10, batch_size=4, micro_batch_size=2, seed=seed)
        dm.setup("fit")
        return dm

    with caplog.at_level("WARNING"):
        dm = build(0)
    stats = dm.stats
    assert stats["train/rows"] == 50 and stats["val/rows"] == 10
    # independent count: rows whose prompt + target exceed 900 tokens
    over = sum(
        len(e.input_ids) == 900 for e in dm.datasets["train"].examples
    ) + stats["train/dropped"]
    assert over == stats["train/truncated"] + stats["train/dropped"] > 0
    assert "longer than max_length=900" in caplog.text
    assert len(dm.datasets["train"]) == 50 - stats["train/dropped"]
    # same seed, same split; another seed, another split
    assert [r["Row Number"] for r in build(0).rows("val")] == [r["Row Number"] for r in dm.rows("val")]
    assert [r["Row Number"] for r in build(1).rows("val")] != [r["Row Number"] for r in dm.rows("val")]


def test_step_batches_carry_micro_batches_and_the_step_token_count(embedded_dir):
    dm = SFTDataModule(MedCalc(source=str(MEDCALC_CSV), limit=40), tokenizer=str(embedded_dir),
                       max_length=1500, val_size=8, batch_size=6, micro_batch_size=2, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    micro = batch["micro_batches"]
    assert [m["input_ids"].shape[0] for m in micro] == [2, 2, 2]
    counted = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
    assert batch["num_target_tokens"] == counted
    # each micro-batch is padded only to its own longest row, and longest rows come first
    widths = [m["input_ids"].shape[1] for m in micro]
    assert widths == sorted(widths, reverse=True)
    for m in micro:
        assert int(m["attention_mask"].sum(1).max()) == m["input_ids"].shape[1]


def test_length_grouped_sampler_is_a_seeded_permutation_with_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(200)]
    sampler = LengthGroupedSampler(lengths, group_size=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(200))
    assert order == list(LengthGroupedSampler(lengths, group_size=8, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != order
    spread = [max(lengths[i] for i in order[j:j + 8]) - min(lengths[i] for i in order[j:j + 8]) for j in range(0, 200, 8)]
    assert sum(spread) / len(spread) < 20  # random groups of 8 would spread about 75


def test_collator_sorts_and_pads():
    from talr.data import Example

    examples = [Example(0, [1, 2, 3], [-100, 2, 3], 1), Example(1, [4, 5, 6, 7, 8], [-100, -100, 6, 7, 8], 2)]
    batch = StepCollator(pad_id=0, micro_batch_size=1)(examples)
    assert batch["num_target_tokens"] == 5
    assert batch["micro_batches"][0]["input_ids"].tolist() == [[4, 5, 6, 7, 8]]
    assert batch["micro_batches"][1]["labels"].tolist() == [[-100, 2, 3]]
    assert torch.equal(batch["micro_batches"][1]["attention_mask"], torch.tensor([[1, 1, 1]]))


def test_bad_configurations_fail_before_training(embedded_dir):
    with pytest.raises(ValueError, match="multiple of data.micro_batch_size"):
        SFTDataModule(MedCalc(), tokenizer=str(embedded_dir), batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="overlength"):
        SFTDataModule(MedCalc(), tokenizer=str(embedded_dir), overlength="wrap")
    dm = SFTDataModule(MedCalc(source=str(MEDCALC_CSV), limit=20), tokenizer=str(embedded_dir),
                       max_length=64, overlength="drop", val_size=4)
    with pytest.raises(DataError, match="zero usable rows"):
        dm.setup("fit")


def test_split_by_keeps_each_query_on_one_side_and_single_rows_split_as_before():
    """ESCI pairs grouped by query: the held-out queries are never trained on. Without split_by the
    split is the seeded shuffle of row positions, written here from its definition."""
    import random

    from talr.tasks import ESCI

    rows = [{"query": f"q{i // 3}", "product_info": f"p{i}", "label": i % 4} for i in range(30)]  # 10 queries x 3
    task = ESCI(source="unused.json")
    grouped = SFTDataModule(task, val_size=7, split_by="query", seed=3)
    train, val = grouped.split_rows(rows)
    assert {r["query"] for r in train}.isdisjoint({r["query"] for r in val})
    assert len(val) == 9 and len(train) == 21  # whole queries until at least 7 rows: three queries
    assert sorted(map(id, train + val)) == sorted(map(id, rows))  # every row on exactly one side
    order = list(range(30))
    random.Random(3).shuffle(order)
    _, val = SFTDataModule(task, val_size=7, seed=3).split_rows(rows)
    assert val == [rows[i] for i in sorted(order[:7])]
    with pytest.raises(DataError, match="split_by='querry', but row 1 has no such field"):
        SFTDataModule(task, val_size=7, split_by="querry").split_rows(rows)
