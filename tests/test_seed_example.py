"""The Hugging Face GPT-NeoX documentation example, verbatim with neoxlite's imports, on a random checkpoint
whose vocabulary is the real GPT-NeoX-20B tokenizer's; and stop strings against transformers on real text."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TOKENIZER_DIR

pytest.importorskip("neoxlite.tokenizer", reason="neoxlite.tokenizer (GPTNeoXTokenizerFast) is not written yet")
if not (TOKENIZER_DIR / "tokenizer.json").exists():
    pytest.skip(f"the real tokenizer is not at {TOKENIZER_DIR}", allow_module_level=True)

REAL_VOCAB = dict(vocab_size=50304, hidden_size=16, num_attention_heads=2, intermediate_size=48,
                  num_hidden_layers=2, max_position_embeddings=2048, shard_kb=1024)


@pytest.fixture(scope="module")
def real_vocab_checkpoint(checkpoint, tmp_path_factory):
    """(folder with tokenizer.json copied in, reference model); the copy goes to tmp, never into the repo."""
    source, ref = checkpoint(**REAL_VOCAB)
    folder = tmp_path_factory.mktemp("real-vocab") / "ckpt"
    shutil.copytree(source, folder)
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", folder / "tokenizer.json")
    return folder, ref


def test_doc_example_runs_verbatim(real_vocab_checkpoint):
    folder, ref = real_vocab_checkpoint
    torch.manual_seed(0)
    # ---- the documentation example, unchanged but for the import line
    from neoxlite import GPTNeoXForCausalLM, GPTNeoXTokenizerFast

    model = GPTNeoXForCausalLM.from_pretrained(folder)
    tokenizer = GPTNeoXTokenizerFast.from_pretrained(folder)

    prompt = "GPTNeoX20B is a 20B-parameter autoregressive Transformer model developed by EleutherAI."

    input_ids = tokenizer(prompt, return_tensors="pt").input_ids

    gen_tokens = model.generate(
        input_ids,
        do_sample=True,
        temperature=0.9,
        max_length=100,
    )
    gen_text = tokenizer.batch_decode(gen_tokens)[0]
    # ---- end of the example
    assert isinstance(gen_text, str) and gen_text.startswith(prompt)
    assert gen_tokens.shape[0] == 1 and input_ids.shape[1] < gen_tokens.shape[1] <= 100
    torch.manual_seed(0)
    want = ref.generate(input_ids, do_sample=True, temperature=0.9, max_length=100)
    assert torch.equal(gen_tokens, want)  # transformers draws the same tokens from the same seed


@pytest.mark.parametrize("where", ["inside-the-reply", "spanning-prompt-and-reply"])
def test_stop_strings_match_reference_on_real_text(real_vocab_checkpoint, where):
    import transformers

    from neoxlite import GPTNeoXForCausalLM, GPTNeoXTokenizerFast

    folder, ref = real_vocab_checkpoint
    model = GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    tokenizer = GPTNeoXTokenizerFast.from_pretrained(folder)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    prompt = "The capital of France is"
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    free = model.generate(input_ids, max_new_tokens=30)
    pieces = [tokenizer.decode([t]) for t in free[0, input_ids.shape[1]:].tolist()]
    if where == "inside-the-reply":  # starts inside token 10, ends inside token 12 (overhangs on both sides)
        before = "".join(pieces[:10])
        stop = (before + pieces[10] + pieces[11] + pieces[12])[len(before) + 1:-1]
        if not stop.strip() or stop in prompt + before:
            pytest.skip("this random continuation gives no usable stop string")
    else:  # the last characters of the prompt and the first of the reply
        stop = prompt[-2:] + pieces[0][:2]
    got = model.generate(input_ids, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer)
    want = ref.generate(input_ids, max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=hf_tokenizer,
                        pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(got, want)
    assert got.shape[1] < free.shape[1] and stop in tokenizer.decode(got[0])
