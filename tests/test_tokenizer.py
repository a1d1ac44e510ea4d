"""neoxlite's GPTNeoXTokenizerFast against transformers' on the real GPT-NeoX-20B tokenizer.json.

The shared folder holds tokenizer.json only; each test folder gets a copy of it plus a tokenizer_config.json
written here, and both libraries load the same folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from neoxlite.tokenizer import BatchEncoding, GPTNeoXTokenizerFast

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).resolve().parents[2] / "shared/tokenizers/gpt-neox-20b"
pytestmark = pytest.mark.skipif(
    not (SHARED / "tokenizer.json").is_file(),
    reason=f"the GPT-NeoX-20B tokenizer is not at {SHARED}/tokenizer.json (shared reference files missing)",
)

# What EleutherAI's hub repos ship: no pad token named (both libraries then default to <|padding|>).
HUB_CONFIG = {
    "tokenizer_class": "GPTNeoXTokenizer",
    "add_prefix_space": False,
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXTS = [
    "Hello world",
    " Hello world",
    "",
    "你好，世界！日本語のテキスト。한국어",
    "emoji 👩‍👩‍👧‍👦 🎉🔥 flags 🇫🇷",
    "combining: e\u0301 cafe\u0301 vs café, n\u0303",
    "many" + " " * 40 + "spaces, and    four",
    "\ttabs\t\t\tand\nnewlines\n\n\n\r\n  indented",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # comment\n",
    "<|endoftext|>special<|endoftext|> in text <|padding|>",
    "chat tokens <|im_start|>assistant<|im_end|>",
    "Don't say 'hello' , ok ? fine !",
    "   leading and trailing   ",
]


def make_folder(root: Path, config: dict | None, special_tokens_map: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED / "tokenizer.json", root / "tokenizer.json")
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    if special_tokens_map is not None:
        (root / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return root


def load_both(folder: Path, **kwargs) -> tuple[GPTNeoXTokenizerFast, object]:
    return (GPTNeoXTokenizerFast.from_pretrained(folder, **kwargs),
            transformers.AutoTokenizer.from_pretrained(folder, **kwargs))


def plain(enc) -> dict:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in dict(enc).items()}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("hub"), HUB_CONFIG)


@pytest.fixture(scope="module")
def pair(hub_folder):
    return load_both(hub_folder)


@pytest.mark.parametrize("text", TEXTS)
def test_single_text_matches(pair, text):
    ours, theirs = pair
    assert plain(ours(text)) == plain(theirs(text))
    assert ours.encode(text) == theirs.encode(text)
    assert ours.tokenize(text) == theirs.tokenize(text)
    ids = theirs(text)["input_ids"]
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids) == text.replace("e\u0301", "é").replace("n\u0303", "ñ")  # lossless up to NFC


def test_batch_decode_and_tensor_inputs(pair):
    ours, theirs = pair
    rows = [theirs.encode(t) for t in TEXTS]
    for skip in (False, True):
        assert ours.batch_decode(rows, skip_special_tokens=skip) == theirs.batch_decode(rows, skip_special_tokens=skip)
    batch = theirs(TEXTS[:3], padding=True, return_tensors="pt")["input_ids"]
    assert ours.batch_decode(batch) == theirs.batch_decode(batch)
    assert ours.decode(batch[0], skip_special_tokens=True) == theirs.decode(batch[0], skip_special_tokens=True)
    assert ours.decode(batch[:1]) == theirs.decode(batch[0])  # a (1, T) tensor decodes as its row
    assert ours.decode(5) == theirs.decode(5)
    with pytest.raises(ValueError, match="batch_decode"):
        ours.decode(batch)


def test_vocabulary_and_special_tokens(pair):
    ours, theirs = pair
    assert len(ours) == len(theirs) == 50281
    assert ours.vocab_size == theirs.vocab_size
    assert ours.get_vocab() == theirs.get_vocab()
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(theirs, name)
        assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_id")
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.model_max_length == theirs.model_max_length
    assert ours.padding_side == theirs.padding_side == "right"
    tokens = ["hello", "Ġworld", "<|padding|>", "not-a-token-at-all"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<|im_end|>") == theirs.convert_tokens_to_ids("<|im_end|>")
    assert ours.convert_ids_to_tokens(50276) == theirs.convert_ids_to_tokens(50276)
    ids = [0, 5, 1, 50277]
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == theirs.convert_ids_to_tokens(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def eos_pad_pair(hub_folder):
    ours, theirs = load_both(hub_folder)
    for tok in (ours, theirs):
        tok.pad_token = tok.eos_token  # the usual recipe; also checks the setter
    assert ours.pad_token_id == theirs.pad_token_id == 0
    return ours, theirs


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("tensors", [None, "pt"])
def test_padded_batches_match(eos_pad_pair, side, tensors):
    ours, theirs = eos_pad_pair
    ours.padding_side = theirs.padding_side = side
    batch = TEXTS[:6]
    for kwargs in ({"padding": True}, {"padding": "longest"}, {"padding": "max_length", "max_length": 64},
                   {"padding": True, "truncation": True, "max_length": 5}):
        a, b = ours(batch, return_tensors=tensors, **kwargs), theirs(batch, return_tensors=tensors, **kwargs)
        assert plain(a) == plain(b), kwargs
        if tensors:
            assert a["input_ids"].dtype == b["input_ids"].dtype == torch.long
    # The call's padding_side wins over the tokenizer's.
    other = "right" if side == "left" else "left"
    assert plain(ours(batch, padding=True, padding_side=other)) == plain(theirs(batch, padding=True, padding_side=other))


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_matches(pair, side):
    ours, theirs = pair
    text = TEXTS[7]
    ours.truncation_side = theirs.truncation_side = side
    try:
        for kwargs in ({"truncation": True, "max_length": 4}, {"max_length": 3}, {"truncation": True},
                       {"truncation": "longest_first", "max_length": 0}, {"truncation": False, "max_length": 2}):
            assert plain(ours(text, **kwargs)) == plain(theirs(text, **kwargs)), kwargs
            assert plain(ours(TEXTS, **kwargs)) == plain(theirs(TEXTS, **kwargs)), kwargs
    finally:
        ours.truncation_side = theirs.truncation_side = "right"


def test_return_tensors_and_batch_encoding(pair):
    ours, theirs = pair
    for text in ("Hello world", "", ["", ""], ["a b", "c d"]):
        a, b = ours(text, return_tensors="pt"), theirs(text, return_tensors="pt")
        assert plain(a) == plain(b)
        assert a.input_ids.shape == b.input_ids.shape and a.input_ids.dtype == b.input_ids.dtype
    enc = ours(["a", "b c"], padding=True, return_tensors="pt").to("cpu")
    assert isinstance(enc, BatchEncoding) and list(enc.keys()) == ["input_ids", "attention_mask"]
    assert enc.input_ids is enc["input_ids"] and enc.attention_mask.tolist() == [[1, 0], [1, 1]]
    assert list(ours("a", return_attention_mask=False)) == ["input_ids"]
    assert torch.equal(ours.encode("Hello world", return_tensors="pt"), theirs.encode("Hello world", return_tensors="pt"))
    with pytest.raises(AttributeError, match="token_type_ids"):
        _ = enc.token_type_ids
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "b c d"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        ours("a", return_tensors="tf")
    with pytest.raises(ValueError, match="padding="):
        ours("a", padding="sideways")
    with pytest.raises(TypeError, match="list of strings"):
        ours([1, 2])


def test_add_special_tokens(tmp_path):
    """add_bos_token/add_eos_token from tokenizer_config.json. transformers 5.x ignores them in the file when
    tokenizer.json is present (4.x honoured them), so we compare with transformers given them as keywords."""
    folder = make_folder(tmp_path, {**HUB_CONFIG, "add_bos_token": True, "add_eos_token": True})
    ours = GPTNeoXTokenizerFast.from_pretrained(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=True)
    assert ours("x").input_ids == theirs("x").input_ids == [0, 89, 0]
    for kwargs in ({}, {"add_special_tokens": False}, {"truncation": True, "max_length": 3},
                   {"padding": "max_length", "max_length": 6}):
        assert plain(ours(TEXTS[:4], **kwargs)) == plain(theirs(TEXTS[:4], **kwargs)), kwargs
    assert ours.decode(ours.encode("hi"), skip_special_tokens=True) == "hi"


def test_padding_without_pad_token_says_how_to_fix(tmp_path):
    ours, theirs = load_both(make_folder(tmp_path, {**HUB_CONFIG, "pad_token": None}))
    assert ours.pad_token is theirs.pad_token is None and ours.pad_token_id is None
    assert ours.all_special_ids == theirs.all_special_ids
    with pytest.raises(ValueError, match=r"tokenizer\.pad_token = tokenizer\.eos_token"):
        ours(["a", "b c"], padding=True)
    ours.pad_token = ours.eos_token
    assert ours(["a", "b c"], padding=True).input_ids == [[66, 0], [67, 260]]


def test_special_token_setters(hub_folder):
    ours = GPTNeoXTokenizerFast.from_pretrained(hub_folder)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.pad_token = "[PAD]"
    assert ours.pad_token == "<|padding|>"
    ours.pad_token_id = 50278
    assert ours.pad_token == "<|im_end|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.eos_token_id = 10**6
    ours.bos_token = None
    assert ours.bos_token_id is None and ours.all_special_tokens == ["<|endoftext|>", "<|im_end|>"]
    ours.add_bos_token = True
    with pytest.raises(ValueError, match="bos_token is None"):
        ours("x")


def test_config_files_variants(tmp_path):
    # Tokens as AddedToken dicts in special_tokens_map.json (which wins over tokenizer_config.json), a token
    # missing from tokenizer.json (added as a new token, like transformers), and the other settings.
    stm = {"eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False}, "pad_token": "[PAD]"}
    config = {**HUB_CONFIG, "eos_token": "<|endoftext|>", "padding_side": "left", "model_max_length": 2048,
              "add_prefix_space": True}
    ours, theirs = load_both(make_folder(tmp_path, config, stm))
    assert (ours.eos_token, ours.pad_token, ours.pad_token_id) == (theirs.eos_token, theirs.pad_token, theirs.pad_token_id)
    assert ours.pad_token_id == 50281 and len(ours) == len(theirs) == 50282
    assert ours.padding_side == theirs.padding_side == "left" and ours.model_max_length == theirs.model_max_length
    for text in ("Hello [PAD] world", "x", TEXTS[3]):
        assert ours.encode(text) == theirs.encode(text)
    assert plain(ours(TEXTS, padding="max_length")) == plain(theirs(TEXTS, padding="max_length", max_length=2048))


def test_padding_max_length_needs_a_length(pair):
    with pytest.raises(ValueError, match="max_length="):
        pair[0](["a", "b c"], padding="max_length")


def test_constructors(hub_folder, tmp_path):
    reference = GPTNeoXTokenizerFast.from_pretrained(hub_folder)
    from_file = GPTNeoXTokenizerFast(tokenizer_file=hub_folder / "tokenizer.json")
    backend = Tokenizer.from_file(str(hub_folder / "tokenizer.json"))
    from_object = GPTNeoXTokenizerFast(tokenizer_object=backend)
    for tok in (from_file, from_object):
        assert tok(TEXTS).input_ids == reference(TEXTS).input_ids
        assert tok.eos_token_id == 0 and tok.pad_token_id == 1 and len(tok) == len(reference)
    with pytest.raises(ValueError, match="exactly one"):
        GPTNeoXTokenizerFast()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        GPTNeoXTokenizerFast.from_pretrained(tmp_path)


def test_chat_template_matches(tmp_path):
    ours, theirs = load_both(make_folder(tmp_path, {**HUB_CONFIG, "chat_template": CHATML}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|endoftext|> 你好"}]
    for gen in (False, True):
        text = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert text == theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert plain(ours.apply_chat_template(messages, add_generation_prompt=gen)) == plain(
            theirs.apply_chat_template(messages, add_generation_prompt=gen))
    a = ours.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    b = theirs.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    assert plain(a) == plain(b) and a.input_ids.shape[0] == 1
    assert ours.apply_chat_template(messages, return_dict=False) == theirs.apply_chat_template(messages, return_dict=False)
    other = "{{ bos_token }}{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    assert ours.apply_chat_template(messages, chat_template=other, tokenize=False) == "<|endoftext|>BE BRIEF.HI <|ENDOFTEXT|> 你好"


def test_named_chat_templates_and_missing_template(tmp_path, pair):
    named = [{"name": "default", "template": CHATML}, {"name": "plain", "template": "{{ messages[0]['content'] }}"}]
    ours = GPTNeoXTokenizerFast.from_pretrained(make_folder(tmp_path / "named", {**HUB_CONFIG, "chat_template": named}))
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert ours.apply_chat_template(messages, chat_template="plain", tokenize=False) == "hi"
    with pytest.raises(ValueError, match="no chat template"):
        pair[0].apply_chat_template(messages)
    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.apply_chat_template(messages, chat_template=failing)


def test_chat_template_jinja_file(tmp_path):
    folder = make_folder(tmp_path, HUB_CONFIG)
    (folder / "chat_template.jinja").write_text(CHATML)
    ours, theirs = load_both(folder)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)


def test_save_pretrained_round_trip(tmp_path):
    config = {**HUB_CONFIG, "padding_side": "left", "model_max_length": 2048, "chat_template": CHATML}
    original = GPTNeoXTokenizerFast.from_pretrained(make_folder(tmp_path / "src", config))
    original.pad_token = original.eos_token
    out = tmp_path / "saved"
    written = original.save_pretrained(out)
    assert sorted(Path(p).name for p in written) == sorted(p.name for p in out.iterdir())  # no temp files left
    ours, theirs = load_both(out)
    for tok in (ours, theirs):
        assert (tok.pad_token_id, tok.padding_side, tok.model_max_length) == (0, "left", 2048)
    assert plain(ours(TEXTS, padding=True)) == plain(theirs(TEXTS, padding=True)) == plain(original(TEXTS, padding=True))
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
    original.save_pretrained(out)  # overwriting an existing save works
    assert GPTNeoXTokenizerFast.from_pretrained(out).encode("hi") == original.encode("hi")


def test_clean_up_tokenization_spaces_is_opt_in(pair):
    ours, theirs = pair
    ids = ours.encode("Hello , world . I 'm here ?")
    assert ours.decode(ids) == theirs.decode(ids) == "Hello , world . I 'm here ?"
    assert ours.decode(ids, clean_up_tokenization_spaces=True) == "Hello, world. I'm here?"
