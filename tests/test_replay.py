"""Replay of general data (data.replay): the mix by hand count, replay rows kept out of validation,
per-source losses against a float64 computation, one `talr fit` on the tiny model, the answer cache,
and the option combinations that must stop."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import build_cli
from conftest import tiny_fit_config
from talr.data import Example, ExampleDataset, SFTDataModule
from talr.general_prompts import GENERAL_PROMPTS
from talr.losses import FLOW, KLToInitial
from talr.models import TokenNLLModel, load_model, load_tokenizer
from talr.replay import MixedDataset, Replay, ReplayMixSampler, check_replay_compatible
from talr.replay_prepass import initial_replay_answers
from talr.replay_prompts import REPLAY_PROMPTS
from talr.tasks import DataError, MedCalc, PromptResponse

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

REPLAY = '{"ratio": 0.25, "max_new_tokens": 12}'


def test_the_built_in_replay_prompts_are_not_the_monitors():
    replay = {p.text for p in REPLAY_PROMPTS}
    assert len(replay) == len(REPLAY_PROMPTS) == 55
    assert replay.isdisjoint(p.text for p in GENERAL_PROMPTS)
    assert Counter(p.category for p in REPLAY_PROMPTS) == Counter(p.category for p in GENERAL_PROMPTS)


def epoch_batches(num_domain: int, num_replay: int, batch_size: int, replay_per_step: int, world: int = 1,
                  epoch: int = 0) -> list[list[list[int]]]:
    """Every rank's batches of one epoch, as Lightning cuts them: rank r takes positions r, r + world, ...
    of the sampler (DistributedSamplerWrapper, no shuffle), in batches of batch_size."""
    sampler = ReplayMixSampler(lambda e: list(range(num_domain)), num_domain, num_replay, batch_size, replay_per_step,
                               seed=3, world_size=world)
    sampler.set_epoch(epoch)
    ranks = []
    for rank in range(world):
        order = list(sampler) if world == 1 else list(DistributedSamplerWrapper(sampler, num_replicas=world, rank=rank,
                                                                               shuffle=False))
        ranks.append([order[i:i + batch_size] for i in range(0, len(order), batch_size)])
    return ranks


@pytest.mark.parametrize("world", [1, 2])
def test_every_step_holds_the_ratio_of_replay_rows_by_hand_count(world):
    # 23 domain rows, batch 8 per rank, ratio 0.25: 2 replay + 6 domain rows per rank and step.
    ranks = epoch_batches(23, 5, 8, 2, world)
    per_step = 6 * world
    full, left = divmod(23, per_step)  # world 1: 3 full steps and 5 rows; world 2: 1 full step and 11 rows
    # the last step's replay rows: in proportion to its domain rows (5 x 2/6 -> 2; 11 x 2/6 -> 4), then up to
    # a whole number of rows per rank (2 ranks: 11 + 4 = 15 rows -> 5 replay rows, 16 rows)
    last_replay = {1: 2, 2: 5}[world]
    seen_domain, seen_replay = Counter(), Counter()
    for batches in ranks:
        assert len(batches) == full + 1
        for step, batch in enumerate(batches):
            replay = [i for i in batch if i >= 23]
            if step < full:
                assert len(batch) == 8 and len(replay) == 2  # exactly the share of rows in every full step
            seen_domain.update(i for i in batch if i < 23)
            seen_replay.update(i - 23 for i in replay)
    assert sum(seen_replay.values()) == full * 2 * world + last_replay
    assert sorted(seen_domain) == list(range(23)) and set(seen_domain.values()) == {1}  # each domain row once
    # replay rows cycle: none is used twice before every one was used once
    assert max(seen_replay.values()) - min(seen_replay[i] for i in range(5)) <= 1


def test_replay_rows_continue_their_cycle_in_the_next_epoch():
    first, second = (epoch_batches(12, 7, 4, 1, epoch=e)[0] for e in (0, 1))
    drawn = [i - 12 for batch in first + second for i in batch if i >= 12]
    assert len(drawn) == 8 and sorted(drawn[:7]) == list(range(7))  # the first cycle is a permutation of all 7


@pytest.fixture(scope="module")
def replay_run(tiny_model_dir, tmp_path_factory):
    """One `talr fit` on the tiny model, 2 steps, a quarter of each 4-row step replayed."""
    out = tmp_path_factory.mktemp("replay-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TALR_CACHE", str(out / "cache"))
        config = tiny_fit_config(tiny_model_dir, out, "replay", [], trainer={"max_steps": 2},
                                 model={"loss": "CrossEntropy"}, validate_before_fit=False)
        cli = build_cli(["fit", "--config", str(config), "--data.replay", REPLAY])
    return cli


def scalars(log_dir: str) -> dict[str, list[float]]:
    events = EventAccumulator(log_dir).Reload()
    return {tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)] for tag in events.Tags()["scalars"]}


def test_fit_logs_the_loss_and_tokens_of_each_source(replay_run):
    logged = scalars(replay_run.trainer.log_dir)
    assert replay_run.trainer.global_step == 2
    for source in ("domain", "replay"):
        assert len(logged[f"train/loss/{source}"]) == 2 and len(logged[f"train/target_tokens/{source}"]) == 2
    for step in range(2):
        total = logged["train/target_tokens/domain"][step] + logged["train/target_tokens/replay"][step]
        assert total == logged["train/target_tokens"][step]


def token_nll_float64(lm, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(token) at every target position (labels != -100) in float64, and each token's row."""
    logits = lm(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = micro["labels"][:, 1:]
    mask = targets != -100
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(targets.shape[0]).unsqueeze(1).expand_as(targets)
    return nll[mask], rows[mask]


def test_per_source_losses_equal_a_float64_computation(replay_run, tiny_model_dir):
    data = replay_run.datamodule
    first_step = next(iter(data.train_dataloader()))  # epoch 0's first batch: what step 1 trained on
    lm = load_model(str(tiny_model_dir), "float32").double().eval()  # the initial weights, in float64
    sums = {False: [0.0, 0], True: [0.0, 0]}
    with torch.no_grad():
        for micro in first_step["micro_batches"]:
            nll, rows = token_nll_float64(lm, micro)
            for is_replay in (False, True):
                chosen = micro["replay"][rows] == is_replay
                sums[is_replay][0] += float(nll[chosen].sum())
                sums[is_replay][1] += int(chosen.sum())
    logged = scalars(replay_run.trainer.log_dir)
    for source, is_replay in (("domain", False), ("replay", True)):
        loss, tokens = sums[is_replay]
        assert tokens > 0 and logged[f"train/target_tokens/{source}"][0] == tokens
        assert logged[f"train/loss/{source}"][0] == pytest.approx(loss / tokens, rel=1e-5)
        assert logged[f"train/nll/{source}"][0] == pytest.approx(loss / tokens, rel=1e-5)  # ce: loss is the NLL


def test_training_batches_mix_and_validation_holds_no_replay_row(replay_run):
    data = replay_run.datamodule
    replay_ids = {tuple(e.input_ids) for e in data.datasets["replay"].examples}
    assert len(replay_ids) > 1
    batches = list(data.train_dataloader())
    # 12 domain rows, 4 a step with 1 replay row: 4 steps of 3 domain rows and 1 replay row
    assert [int(sum(m["replay"].sum() for m in b["micro_batches"])) for b in batches] == [1, 1, 1, 1]
    domain = sorted(int(i) for b in batches for m in b["micro_batches"] for i, r in zip(m["row_index"], m["replay"]) if not r)
    assert domain == list(range(12))
    assert not any(e.replay for e in data.datasets["val"].examples)
    validated = [ids[mask.bool()].tolist() for batch in data.val_dataloader()
                 for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert len(validated) == 4 and not replay_ids & {tuple(ids) for ids in validated}


def test_the_initial_answers_come_from_the_cache_the_second_time(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TALR_CACHE", str(tmp_path))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    net = TokenNLLModel(load_model(str(tiny_model_dir), "float32"))
    prompts = [tokenizer(p.text)["input_ids"] for p in REPLAY_PROMPTS[:5]]
    first = initial_replay_answers(net, tokenizer, prompts, 6, 4, "cpu", "32-true")
    assert "[replay: initial answers] done: 2 batches" in capsys.readouterr().out  # the plain progress line
    assert len(first) == 5 and all(0 < len(a) <= 6 for a in first)
    with monkeypatch.context() as patched:
        patched.setattr(TokenNLLModel, "generate", lambda *a, **k: pytest.fail("generated again"))
        assert initial_replay_answers(net, tokenizer, prompts, 6, 4, "cpu", "32-true") == first
    assert len(list((tmp_path / "initial" / "replay").glob("*.pt"))) == 1


def test_longest_micro_batch_includes_replay_rows_for_the_memory_budget():
    data = SFTDataModule(MedCalc(source="synthetic"), batch_size=4, micro_batch_size="auto", memory_budget="1GiB",
                         replay=Replay(0.25))
    data.tokenizer = SimpleNamespace(pad_token_id=0)

    def examples(lengths):
        return ExampleDataset([Example(i, [1] * n, [1] * n, 0) for i, n in enumerate(lengths)], [{}] * len(lengths))

    data.datasets["train"] = examples([5, 7])
    data.set_replay_examples(examples([30, 3]))
    assert data.longest_micro_batch(1)["input_ids"].shape == (1, 30)
    assert data.longest_micro_batch(2)["replay"].tolist() == [True, False]
    assert isinstance(MixedDataset(data.datasets["train"].examples, data.datasets["replay"].examples)[2], Example)


def test_bad_replay_options_stop_with_the_reason(tmp_path):
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"data.replay.ratio .* must be in \(0, 1\)"):
            Replay(ratio)
    with pytest.raises(ValueError, match=r"0.3 x data.batch_size 8 = 2.4 replay rows per step.*use 0.25 \(2 rows\) "
                                         r"or 0.375 \(3 rows\)"):
        SFTDataModule(MedCalc(source="synthetic"), batch_size=8, micro_batch_size=4, replay=Replay(0.3))
    with pytest.raises(ValueError, match="either task .* or prompts_file"):
        Replay(0.25, task=MedCalc(source="synthetic"), prompts_file="x.txt")
    with pytest.raises(FileNotFoundError, match="no-such.txt"):
        Replay(0.25, prompts_file=str(tmp_path / "no-such.txt"))
    for loss in (FLOW(), KLToInitial(base=FLOW())):
        with pytest.raises(ValueError, match="FLOW weights each training row .* replay rows have no such weight"):
            check_replay_compatible(loss)


def test_flow_with_replay_stops_before_training(tiny_model_dir, tmp_path):
    config = tiny_fit_config(tiny_model_dir, tmp_path, "flow", [], trainer={"max_steps": 1},
                             model={"loss": "FLOW"}, validate_before_fit=True)
    with pytest.raises(ValueError, match="data.replay with model.loss FLOW"):
        build_cli(["fit", "--config", str(config), "--data.replay", REPLAY])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_replay_on_the_forgetting_monitors_prompts_stops(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.text for p in GENERAL_PROMPTS[:3]) + "\nA prompt of my own.\n")
    monitor = {"class_path": "callbacks.forgetting_monitor.ForgettingMonitor", "init_args": {"max_new_tokens": 4}}
    config = tiny_fit_config(tiny_model_dir, tmp_path, "shared", [monitor], trainer={"max_steps": 1},
                             model={"loss": "CrossEntropy"}, validate_before_fit=False)
    with pytest.raises(ValueError, match="trains on 3 of the ForgettingMonitor's prompts"):
        build_cli(["fit", "--config", str(config), "--data.replay.ratio", "0.25",
                   "--data.replay.prompts_file", str(prompts)])


def test_a_prompt_response_file_is_replayed_as_given(tiny_model_dir, tmp_path):
    pairs = tmp_path / "general.jsonl"
    pairs.write_text("".join(f'{{"prompt": "Say {w}.", "response": "{w}"}}\n' for w in ("yes", "no", "maybe")))
    task = PromptResponse(str(pairs))
    data = SFTDataModule(MedCalc(source="synthetic", num_synthetic=16, calculators=["bmi"]), tokenizer=str(tiny_model_dir),
                         val_size=4, batch_size=4, micro_batch_size=2, max_length=384, replay=Replay(0.5, task=task))
    data.setup("fit")
    replay = data.datasets["replay"].examples
    assert [e.replay for e in replay] == [True] * 3 and data.replay_prompts() == {"Say yes.", "Say no.", "Say maybe."}
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.decode(replay[1].input_ids[replay[1].prompt_len:]) == "no<|im_end|>"  # the response is the target
    steps = list(data.train_dataloader())
    assert len(steps) == data.steps_per_epoch() == 6  # 12 domain rows, 2 a step
    assert [int(sum(m["replay"].sum() for m in s["micro_batches"])) for s in steps] == [2] * 6
    bad = tmp_path / "bad.csv"
    bad.write_text("question,response\nhi,there\n")
    with pytest.raises(DataError, match="bad.csv: missing required column\\(s\\): prompt"):
        PromptResponse(str(bad)).read()


class StopAfterOneStep(L.Callback):
    """Ends a 2-step fit after its first step, as an interrupted run (the schedule keeps its 2-step length)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = True


def test_a_resumed_run_continues_the_mix_exactly(replay_run, tiny_model_dir, tmp_path, monkeypatch):
    """1 of 2 steps, checkpoint, resume with generation forbidden (the resumed weights are no longer the
    initial ones, so the answers must come from the checkpoint): the same weights, bit for bit, as the
    uninterrupted 2-step run."""
    monkeypatch.setenv("TALR_CACHE", str(tmp_path / "cache"))
    every_step = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1, "save_last": True}}

    def fit(version: str, callbacks: list, *extra: str):
        config = tiny_fit_config(tiny_model_dir, tmp_path, version, callbacks, trainer={"max_steps": 2},
                                 model={"loss": "CrossEntropy"}, validate_before_fit=False)
        return build_cli(["fit", "--config", str(config), "--data.replay", REPLAY, *extra])

    assert fit("first", [every_step, {"class_path": "test_replay.StopAfterOneStep"}]).trainer.global_step == 1
    monkeypatch.setattr(TokenNLLModel, "generate", lambda *a, **k: pytest.fail("generated again on resume"))
    resumed = fit("resumed", [every_step], "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.trainer.global_step == 2
    expected = replay_run.model.net.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in resumed.model.net.state_dict().items())
