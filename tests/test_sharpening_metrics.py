"""Metrics that separate learning and forgetting from sharpening, checked against float64 computations
written here from their definitions, and the sharpening test: multiplying a model's logits by a
constant (a pure temperature change) moves the mean NLL and the KL, but not the calibrated NLL, the
top-1 accuracy or the top-1 agreement, and the entropy drops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from callbacks.forgetting_monitor import ForgettingMonitor, divergence
from talr.data import Example, pad_examples
from talr.evaluation import DomainEvaluation
from talr.general_prompts import GENERAL_PROMPTS
from talr.models import TokenNLLModel
from talr.token_loss import CALIBRATION_TEMPERATURES, IGNORE_INDEX, target_token_statistics

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TEXTS = [("What is 2 + 3?", "2 + 3 = 5. The answer is 5."),
         ("Name the capital of France.", "The capital of France is Paris."),
         ("Convert 1 inch to cm.", "One inch is 2.54 centimetres.")]


def test_token_statistics_match_their_definitions_in_float64():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, :2] = IGNORE_INDEX
    choices = torch.tensor([3, 7, 11])
    stats = target_token_statistics(hidden, weight, labels, chunk_size=3, choices=choices)  # several chunks
    logits64, targets = [], []
    for b in range(2):
        for t in range(6):
            if labels[b, t + 1] != IGNORE_INDEX:
                logits64.append(hidden[b, t].double() @ weight.double().T)
                targets.append(int(labels[b, t + 1]))
    logits64, targets = torch.stack(logits64), torch.tensor(targets)
    log_p = logits64 - logits64.logsumexp(-1, keepdim=True)
    torch.testing.assert_close(stats["nll"].double(), -log_p[torch.arange(len(targets)), targets], atol=1e-5, rtol=0)
    assert torch.equal(stats["argmax"], logits64.argmax(-1))
    torch.testing.assert_close(stats["entropy"].double(), -(log_p.exp() * log_p).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["choice_logprobs"].double(), log_p[:, choices], atol=1e-5, rtol=0)
    for k, temperature in enumerate(CALIBRATION_TEMPERATURES):
        log_q = logits64 / temperature - (logits64 / temperature).logsumexp(-1, keepdim=True)
        torch.testing.assert_close(stats["nll_at_temperature"][:, k].double(),
                                   -log_q[torch.arange(len(targets)), targets], atol=1e-4, rtol=1e-6)


def untied_copy(model_dir, scale: float) -> LlamaForCausalLM:
    """The tiny model with its own output head, the head's weight times `scale`: logits times `scale`,
    hidden states unchanged (a pure temperature change of 1 / scale)."""
    tied = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    config = tied.config
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    model.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(tied.get_input_embeddings().weight * scale)
    return model.eval()


def examples(tokenizer) -> list[Example]:
    out = []
    for i, (prompt, answer) in enumerate(TEXTS):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append(Example(row_index=i, input_ids=p + a, labels=[IGNORE_INDEX] * len(p) + a, prompt_len=len(p)))
    return out


def reference_rows(model, batch) -> list[dict]:
    """Each row's target-token sums from the model's own full logits, in float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    rows = []
    for b in range(logits.shape[0]):
        row = {"tokens": 0, "nll": 0.0, "top1_hits": 0, "easy": 0, "grid": torch.zeros(len(CALIBRATION_TEMPERATURES), dtype=torch.float64)}
        for t in range(logits.shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target == IGNORE_INDEX:
                continue
            z = logits[b, t]
            loss = float(z.logsumexp(-1) - z[target])
            row["tokens"] += 1
            row["nll"] += loss
            row["top1_hits"] += int(z.argmax()) == target
            row["easy"] += math.exp(-loss) > 0.2
            row["grid"] += torch.tensor([float((z / T).logsumexp(-1) - z[target] / T) for T in CALIBRATION_TEMPERATURES],
                                        dtype=torch.float64)
        rows.append(row)
    return rows


def reference_metrics(model, batch) -> dict[str, float]:
    """The validation metrics from the model's own full logits, in float64."""
    rows = reference_rows(model, batch)
    n = sum(r["tokens"] for r in rows)
    grid = sum(r["grid"] for r in rows)
    best = int(grid.argmin())
    return {"loss": sum(r["nll"] for r in rows) / n, "token_accuracy": sum(r["top1_hits"] for r in rows) / n,
            "share_above_0.2": sum(r["easy"] for r in rows) / n,
            "calibrated_loss": float(grid[best]) / n, "temperature": CALIBRATION_TEMPERATURES[best]}


def evaluate(model, batch):
    evaluation = DomainEvaluation()
    evaluation.add(TokenNLLModel(model), None, {**batch, "row_index": torch.arange(len(batch["input_ids"]))}, None, [],
                   max_new_tokens=None)
    return evaluation.finish(None, [])


def evaluation_metrics(model, batch) -> dict[str, float]:
    return evaluate(model, batch)[0]


def test_each_rows_token_sums_match_an_independent_computation(embedded_dir, tokenizer):
    batch = pad_examples(examples(tokenizer), tokenizer.pad_token_id)
    model = untied_copy(embedded_dir, 1.0)
    _, _, rows = evaluate(model, batch)
    expected = reference_rows(model, batch)
    assert [r.row_index for r in rows] == list(range(len(TEXTS)))
    for row, reference in zip(rows, expected):
        assert (row.tokens, row.top1_hits, row.easy) == (reference["tokens"], reference["top1_hits"], reference["easy"])
        assert row.nll == pytest.approx(reference["nll"], abs=1e-4)
        assert row.nll_at_temperature == pytest.approx(reference["grid"].tolist(), abs=1e-3)


def test_one_pass_over_prompt_and_target_scores_the_rows_and_starts_the_generation(embedded_dir, tokenizer):
    """With a generation to come, the rows are scored on the prompt-aligned layout and the generation
    starts from that pass's cache of the prompts: the sums equal the independent float64 ones of a
    plain right-padded forward, and the greedy tokens equal a generation that runs the prompts itself."""
    from talr.data import left_pad_prompts
    from talr.generation import generate_token_ids
    from talr.scoring import score_batch_with_cache

    rows = examples(tokenizer)
    assert len({e.prompt_len for e in rows}) > 1  # the prompts are left-padded to different extents
    batch = {**pad_examples(rows, tokenizer.pad_token_id), **left_pad_prompts(rows, tokenizer.pad_token_id)}
    model = untied_copy(embedded_dir, 1.0)
    net = TokenNLLModel(model)
    scored, cache = score_batch_with_cache(net, batch)
    assert cache.get_seq_length() == batch["prompt_ids"].shape[1] - 1
    for scores, reference in zip(scored, reference_rows(model, batch)):
        assert scores.nll.numel() == reference["tokens"] and int(scores.correct.sum()) == reference["top1_hits"]
        assert float(scores.nll.double().sum()) == pytest.approx(reference["nll"], abs=1e-4)
    with_cache = generate_token_ids(net, tokenizer, batch["prompt_ids"], batch["prompt_mask"], 12, cache=cache)
    without = generate_token_ids(net, tokenizer, batch["prompt_ids"], batch["prompt_mask"], 12)
    assert torch.equal(with_cache, without)


def test_validation_metrics_match_an_independent_computation_and_ignore_sharpening(embedded_dir, tokenizer):
    # the embedded model, not the random tiny one: its best temperature lies inside the grid, not at an end
    batch = pad_examples(examples(tokenizer), tokenizer.pad_token_id)
    base, sharp = untied_copy(embedded_dir, 1.0), untied_copy(embedded_dir, 2.0)
    measured = {name: evaluation_metrics(m, batch) for name, m in (("base", base), ("sharp", sharp))}
    for name, model in (("base", base), ("sharp", sharp)):
        expected = reference_metrics(model, batch)
        for key, value in expected.items():
            assert measured[name][key] == pytest.approx(value, abs=1e-5), (name, key)
    # a pure temperature change: the mean NLL moves, the calibrated NLL and top-1 accuracy do not
    assert abs(measured["sharp"]["loss"] - measured["base"]["loss"]) > 0.05
    assert 0 < measured["base"]["token_accuracy"] < 1
    assert measured["sharp"]["calibrated_loss"] == pytest.approx(measured["base"]["calibrated_loss"], abs=1e-5)
    assert measured["sharp"]["temperature"] == pytest.approx(2 * measured["base"]["temperature"])
    assert measured["sharp"]["token_accuracy"] == measured["base"]["token_accuracy"]


def answered_by_the_initial_model(model_dir, tokenizer, samples_per_prompt: int):
    """The tiny model (untied), a ForgettingMonitor holding its answers to 6 general prompts with their
    initial scores, and the monitor's drift numbers of any other model on those answers."""
    base = untied_copy(model_dir, 1.0)
    monitor = ForgettingMonitor(samples_per_prompt=samples_per_prompt, max_new_tokens=6, batch_size=8)
    monitor.prompts = list(GENERAL_PROMPTS[:6])

    def module(model):
        return SimpleNamespace(tokenizer=tokenizer, lm=model, net=TokenNLLModel(model), device=torch.device("cpu"))

    monitor.responses = monitor.sample_initial_responses(module(base))
    for response, scores in zip(monitor.responses, monitor.score_responses(module(base))):
        response["initial_nll"], response["initial_argmax"] = scores.nll.tolist(), scores.argmax.tolist()

    def drift(model) -> dict[str, float]:
        return divergence(list(zip(monitor.responses, monitor.score_responses(module(model)))))

    return base, monitor, drift


def answer_token_logits(base, other, responses):
    """(base logits, other logits, token) in float64 at each answer token of the stored responses."""
    for response in responses:
        ids = torch.tensor([response["prompt_ids"] + response["response_ids"]])
        with torch.no_grad():
            z0, z = base(input_ids=ids).logits[0].double(), other(input_ids=ids).logits[0].double()
        start = len(response["prompt_ids"])
        for t, token in enumerate(response["response_ids"]):
            yield z0[start + t - 1], z[start + t - 1], token


def test_drift_metrics_separate_sharpening_from_forgetting(tiny_model_dir, tokenizer):
    # sampled answers (from p0 at temperature 1): the temperature nearest p0 is near 1, inside the grid
    base, monitor, drift = answered_by_the_initial_model(tiny_model_dir, tokenizer, samples_per_prompt=2)

    unchanged, sharpened = drift(base), drift(untied_copy(tiny_model_dir, 2.0))
    assert unchanged["kl"] == pytest.approx(0, abs=1e-6) and unchanged["agreement"] == 1.0
    # an independent computation of the sharpened model's numbers on the same answer tokens
    kl, entropy, tokens = 0.0, 0.0, 0
    sharp = untied_copy(tiny_model_dir, 2.0)
    for z0, z, token in answer_token_logits(base, sharp, monitor.responses):
        log_p0, log_p = z0.log_softmax(-1), z.log_softmax(-1)
        ratio = math.exp(float(log_p[token] - log_p0[token]))
        kl += ratio - 1 - math.log(ratio)
        entropy += float(-(log_p.exp() * log_p).sum())
        tokens += 1
    assert sharpened["tokens"] == tokens
    assert sharpened["kl"] == pytest.approx(kl / tokens, rel=1e-4)
    assert sharpened["entropy"] == pytest.approx(entropy / tokens, rel=1e-4)
    # the present KL rises; the best temperature doubles and the KL left at it does not move
    assert sharpened["kl"] > 0.01
    assert sharpened["temperature"] == pytest.approx(2 * unchanged["temperature"])
    assert sharpened["kl_calibrated"] == pytest.approx(unchanged["kl_calibrated"], abs=1e-6)
    assert sharpened["agreement"] == 1.0
    assert sharpened["entropy"] < unchanged["entropy"] - 0.01  # a near-uniform random model: a small drop


def test_calibrated_kl_on_greedy_answers_is_the_lowest_kl_over_the_temperatures(tiny_model_dir, tokenizer):
    """Greedy answers (p0's argmax tokens): lowering the temperature always raises their probability,
    so the temperature is chosen by the divergence itself, computed here over the grid in float64."""
    base, monitor, drift = answered_by_the_initial_model(tiny_model_dir, tokenizer, samples_per_prompt=1)

    # a temperature on the grid (2 = 2^(8/8)) is undone exactly
    doubled = drift(untied_copy(tiny_model_dir, 2.0))
    assert doubled["kl"] > 0.01
    assert doubled["temperature"] == pytest.approx(2.0) and doubled["kl_calibrated"] == pytest.approx(0, abs=1e-6)
    # between grid points (1.5): the lowest k3 over the grid, from the definition
    scale = 1.5
    sharp = untied_copy(tiny_model_dir, scale)
    log_ratios = []  # [tokens, temperatures] of log p_T - log p0
    for z0, z, token in answer_token_logits(base, sharp, monitor.responses):
        log_p0 = z0.log_softmax(-1)[token]
        log_ratios.append([float((z / T).log_softmax(-1)[token] - log_p0) for T in CALIBRATION_TEMPERATURES])
    per_temperature = [sum(math.expm1(row[k]) - row[k] for row in log_ratios) / len(log_ratios)
                       for k in range(len(CALIBRATION_TEMPERATURES))]
    best = min(range(len(per_temperature)), key=per_temperature.__getitem__)
    measured = drift(sharp)
    assert measured["temperature"] == pytest.approx(CALIBRATION_TEMPERATURES[best])
    assert measured["kl_calibrated"] == pytest.approx(per_temperature[best], rel=1e-3, abs=1e-7)
    assert 0 < measured["kl_calibrated"] < measured["kl"]


ESCI_ROWS = [("usb c cable", "Anker USB C cable, 6 ft, braided", 0), ("usb c cable", "Lightning cable for iPhone", 1),
             ("usb c cable", "USB C wall charger 20W", 2), ("usb c cable", "Garden hose 50 ft", 3),
             ("red mug", "Red ceramic coffee mug 12 oz", 0), ("red mug", "Blue ceramic coffee mug", 1),
             ("red mug", "Mug warmer for desk", 2), ("red mug", "Bicycle helmet, adult", 3)]


def esci_batch(tokenizer, task):
    from talr.data import encode_example, left_pad_prompts, turn_end_text

    rows = [{"query": q, "product_info": p, "label": label} for q, p, label in ESCI_ROWS]
    encoded = [encode_example(tokenizer, task, row, i, 512, "error", turn_end_text(tokenizer)) for i, row in enumerate(rows)]
    batch = {**pad_examples(encoded, tokenizer.pad_token_id), **left_pad_prompts(encoded, tokenizer.pad_token_id)}
    return rows, encoded, {**batch, "row_index": torch.arange(len(rows))}


@pytest.mark.parametrize("generate", [False, True])
def test_classification_rows_keep_each_class_log_probability_and_the_label_auc(tiny_model_dir, tokenizer, generate):
    """ESCI label only: each held-out row's log-probability of each class digit at its first target
    position equals a float64 log-softmax of the model's own logits after the prompt; val/label_auc is
    the macro one-vs-rest ROC AUC (sklearn) of those log-probabilities centred per row."""
    from sklearn.metrics import roc_auc_score

    from talr.tasks.esci import ESCI

    task = ESCI(source="unused", cot=False)
    rows, encoded, batch = esci_batch(tokenizer, task)
    model = untied_copy(tiny_model_dir, 1.0)
    evaluation = DomainEvaluation()
    evaluation.add(TokenNLLModel(model), tokenizer, batch, task, rows, max_new_tokens=3 if generate else None)
    metrics, _, scored = evaluation.finish(task, rows)
    digit_ids = [tokenizer(str(k), add_special_tokens=False)["input_ids"][0] for k in range(4)]
    expected = []
    with torch.no_grad():
        for example in encoded:
            prompt = torch.tensor([example.input_ids[:example.prompt_len]])
            log_p = model(input_ids=prompt).logits[0, -1].double().log_softmax(-1)
            expected.append(log_p[digit_ids])
    expected = torch.stack(expected)
    assert [r.choice for r in scored] == [label for _, _, label in ESCI_ROWS]
    torch.testing.assert_close(torch.tensor([r.choice_logprobs for r in scored], dtype=torch.float64), expected,
                               atol=1e-4, rtol=0)
    centred = (expected - expected.mean(1, keepdim=True)).numpy()
    labels = [label for _, _, label in ESCI_ROWS]
    macro = sum(roc_auc_score([y == k for y in labels], centred[:, k]) for k in range(4)) / 4
    assert metrics["label_auc"] == pytest.approx(macro, abs=1e-9)
    support = [labels.count(k) / len(labels) for k in range(4)]
    weighted = sum(support[k] * roc_auc_score([y == k for y in labels], centred[:, k]) for k in range(4))
    assert metrics["label_auc_weighted"] == pytest.approx(weighted, abs=1e-9)
    from talr.evaluation import describe_metrics

    assert f"label AUC {macro:.3f}" in describe_metrics(metrics)  # the validation's log line


def test_choices_that_do_not_begin_the_targets_are_refused(tiny_model_dir, tokenizer):
    from talr.tasks.base import DataError
    from talr.tasks.esci import ESCI

    class Shuffled(ESCI):
        def choice_index(self, row):
            return (int(row["label"]) + 1) % 4  # not the class its target starts with

    task = Shuffled(source="unused", cot=False)
    rows, _, batch = esci_batch(tokenizer, task)
    with pytest.raises(DataError, match="target starts with token"):
        DomainEvaluation().add(TokenNLLModel(untied_copy(tiny_model_dir, 1.0)), tokenizer, batch, task, rows, None)
