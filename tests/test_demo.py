"""The shipped demo: loads through the normal loader, generates Python, and each head answers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import neoxlite
from neoxlite.demo import HEADS, demo_head_paths, demo_path


@pytest.fixture(scope="module")
def demo() -> tuple[neoxlite.GPTNeoXForCausalLM, neoxlite.GPTNeoXTokenizerFast]:
    return neoxlite.load_demo()


def test_demo_paths() -> None:
    assert (demo_path() / "config.json").is_file()
    assert demo_head_paths() == [demo_path(h) for h in HEADS]
    with pytest.raises(ValueError, match="question-answering"):
        demo_path("qa")


def test_demo_is_small_hub_checkpoint() -> None:
    folder = demo_path()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 30e6
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]


def test_demo_generates_python(demo) -> None:
    model, tokenizer = demo
    assert isinstance(model, neoxlite.GPTNeoXForCausalLM) and model.config.pad_token_id == tokenizer.pad_token_id == 1
    ids = tokenizer("def add(a, b):\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 12)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert "return" in text or "\n" in text  # the body of a function, not noise


def test_demo_heads_share_the_base_shard() -> None:
    for head in HEADS:
        index = json.loads((demo_path(head) / "model.safetensors.index.json").read_text())
        shared = {f for f in index["weight_map"].values() if f.startswith("../model/")}
        assert len(shared) == 1
        digest = hashlib.sha256((demo_path(head) / shared.pop()).read_bytes()).hexdigest()
        assert digest == index["metadata"]["base_shard_sha256"], f"{head} was trained on another base: rerun the heads"


def test_token_classification_head() -> None:
    model = neoxlite.GPTNeoXForTokenClassification.from_pretrained(demo_path("token-classification"))
    tokenizer = neoxlite.GPTNeoXTokenizerFast.from_pretrained(demo_path("token-classification"))
    text = "def area(r):\n    # circle\n    return 3.14 * r * r\n"
    ids = tokenizer.encode(text)
    with torch.inference_mode():
        pred = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
    label_at = []  # label of the token that holds each character (the text is ASCII: one char per byte)
    for i, p in zip(ids, pred, strict=True):
        label_at += [model.config.id2label[p]] * len(tokenizer.decode([i]))
    assert "".join(tokenizer.decode([i]) for i in ids) == text

    def label(word: str) -> str:
        return label_at[text.index(word) + len(word) - len(word.lstrip())]

    assert label("def") == label(" return") == "KEYWORD"
    assert label(" area") == "NAME" and label(" circle") == "COMMENT"
    assert label(" 3.14") == "NUMBER" and label(" *") == "OP"


@pytest.mark.parametrize("text, label", [
    ("import os.path", "import"),
    ("class Point:\n    x: int", "class"),
    ("def norm(v):\n    return sum(x * x for x in v) ** 0.5", "function"),
    ("for item in items:\n    print(item)", "control_flow"),
    ("total = 0", "statement"),
])
def test_sequence_classification_head(text: str, label: str) -> None:
    model = neoxlite.GPTNeoXForSequenceClassification.from_pretrained(demo_path("sequence-classification"))
    tokenizer = neoxlite.GPTNeoXTokenizerFast.from_pretrained(demo_path("sequence-classification"))
    with torch.inference_mode():
        logits = model(tokenizer(text, return_tensors="pt").input_ids).logits
    assert model.config.id2label[int(logits.argmax())] == label


def test_question_answering_head() -> None:
    folder = demo_path("question-answering")
    model = neoxlite.GPTNeoXForQuestionAnswering.from_pretrained(folder)
    tokenizer = neoxlite.GPTNeoXTokenizerFast.from_pretrained(folder)
    context = ("def width(self):\n    return self.right - self.left\n\n"
               "def name(self):\n    return self._name.upper()\n")
    q = tokenizer.encode("What does name return?\n")
    c = tokenizer.encode(context)
    with torch.inference_mode():
        out = model(torch.tensor([q + c]))
    start = int(out.start_logits[0, len(q):].argmax())
    end = start + int(out.end_logits[0, len(q) + start:len(q) + start + 64].argmax())
    assert tokenizer.decode(c[start:end + 1]).strip() == "self._name.upper()"


def test_transformers_loads_the_demo_the_same() -> None:
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[10, 200, 3000, 45, 7]])
    ours = neoxlite.GPTNeoXForCausalLM.from_pretrained(demo_path(), dtype=torch.float32)
    ref = transformers.GPTNeoXForCausalLM.from_pretrained(demo_path(), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(demo_path())
    assert tok("def f(x):\n").input_ids == neoxlite.GPTNeoXTokenizerFast.from_pretrained(demo_path())("def f(x):\n").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
