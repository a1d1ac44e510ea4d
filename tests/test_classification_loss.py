"""Sequence classification loss as transformers computes it: config.problem_type (regression, single- or multi-label)
set in config.json or inferred from num_labels and the labels' dtype, and recorded in the config once inferred."""

from __future__ import annotations

import json

import pytest
import torch

import neoxlite
from neoxlite.config import GPTNeoXConfig

transformers = pytest.importorskip("transformers")

PAD = 1
ARCH = "GPTNeoXForSequenceClassification"


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, two right-padded: the loss reads each row's last real token."""
    ids = torch.randint(2, 96, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, n in ((1, 3), (2, 6)):
        ids[row, 10 - n:], mask[row, 10 - n:] = PAD, 0
    return ids, mask


def labels_for(kind: str, num_labels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "regression":
        return torch.randn(3, generator=g) if num_labels == 1 else torch.randn(3, num_labels, generator=g)
    if kind == "single_label_classification":
        return torch.tensor([2, -100, 0])  # -100: ignored, as in transformers
    return torch.randint(0, 2, (3, num_labels), generator=g).float()


CASES = [  # (problem_type written to config.json or None to infer it, what it is, num_labels)
    (None, "regression", 1),
    ("regression", "regression", 1),
    ("regression", "regression", 3),
    (None, "single_label_classification", 3),
    ("single_label_classification", "single_label_classification", 3),
    (None, "multi_label_classification", 3),
    ("multi_label_classification", "multi_label_classification", 3),
]


@pytest.mark.parametrize("problem_type,kind,num_labels", CASES,
                         ids=[f"{k}-{n}-{'set' if p else 'inferred'}" for p, k, n in CASES])
def test_loss_matches_reference(checkpoint, problem_type, kind, num_labels):
    folder, _ = checkpoint(ARCH, pad_token_id=PAD, num_labels=num_labels, problem_type=problem_type)
    assert json.loads((folder / "config.json").read_text()).get("problem_type") == problem_type
    model = neoxlite.GPTNeoXForSequenceClassification.from_pretrained(folder, progress=False)
    ref = transformers.GPTNeoXForSequenceClassification.from_pretrained(folder).eval()  # fresh: forward edits its config
    assert model.config.problem_type == problem_type
    ids, mask = batch()
    labels = labels_for(kind, num_labels)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, labels=labels)
        want = ref(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    assert model.config.problem_type == ref.config.problem_type == kind  # inferred once, then kept, as transformers does


def test_multi_label_differs_from_single_label_on_the_same_head(checkpoint):
    folder, _ = checkpoint(ARCH, pad_token_id=PAD, num_labels=3)
    ids, mask = batch()
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 1, 0]), 3)
    losses = {}
    for labels in (one_hot.argmax(-1), one_hot.float()):  # long: single-label; float: multi-label
        model = neoxlite.GPTNeoXForSequenceClassification.from_pretrained(folder, progress=False)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, labels=labels)
        losses[model.config.problem_type] = out.loss
        pooled = out.logits
    assert set(losses) == {"single_label_classification", "multi_label_classification"}
    torch.testing.assert_close(losses["multi_label_classification"],
                               torch.nn.functional.binary_cross_entropy_with_logits(pooled, one_hot.float()))


def test_inferred_problem_type_is_saved(checkpoint, tmp_path):
    folder, _ = checkpoint(ARCH, pad_token_id=PAD, num_labels=3)
    model = neoxlite.GPTNeoXForSequenceClassification.from_pretrained(folder, progress=False)
    with torch.no_grad():
        model(*batch(), labels=labels_for("multi_label_classification", 3))
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["problem_type"] == "multi_label_classification"
    assert transformers.AutoConfig.from_pretrained(tmp_path / "saved").problem_type == "multi_label_classification"


@pytest.mark.parametrize("problem_type", [None, "regression", "single_label_classification", "multi_label_classification"])
def test_problem_type_round_trips_through_config(tmp_path, problem_type):
    config = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=128,
                           vocab_size=96, num_labels=3, problem_type=problem_type)
    assert ("problem_type" in config.to_dict()) == (problem_type is not None)
    config.save_pretrained(tmp_path)
    assert GPTNeoXConfig.from_json_file(tmp_path / "config.json").problem_type == problem_type
    assert GPTNeoXConfig.from_json_file(tmp_path / "config.json").extra.get("problem_type") is None


def test_bad_problem_type_is_a_clear_error():
    with pytest.raises(ValueError, match="problem_type"):
        GPTNeoXConfig.from_dict({"problem_type": "ranking"})
    with pytest.raises(ValueError, match="num_labels > 1"):
        GPTNeoXConfig.from_dict({"problem_type": "single_label_classification", "num_labels": 1})
