"""Trains neoxlite's built-in demo: a small GPT-NeoX on the Python standard library, and three heads.

    python tools/train_demo.py all     # tokenizer, lm, heads, report (timings in tools/demo_report.md)
    python tools/train_demo.py tokenizer|lm|export|heads|report   # one stage; export re-writes the base
                                                                  # from tools/work/lm_state.pt

Everything runs on the CPU with torch.set_num_threads(2) and fixed seeds; the corpus and its split are
tools/demo_data.py's (held-out files listed in tools/demo_split.json). Work files and logs go to
tools/work/ (ignored by git); the shipped folders are written atomically into neoxlite/demo/:

    model/                     GPTNeoXForCausalLM, fp16, hub layout in three shards:
                                 00001 = embed_in + layers 0..2, 00002 = layers 3..5 + final_layer_norm,
                                 00003 = embed_out
    token-classification/      GPTNeoXForTokenClassification   (token types of Python's tokenize module)
    sequence-classification/   GPTNeoXForSequenceClassification (kind of statement a chunk starts with)
    question-answering/        GPTNeoXForQuestionAnswering      ("What does NAME return?")

The heads fine-tune the top three layers, the final layer norm and their head on a frozen base, so each
head folder stores only those (model-head.safetensors); its model.safetensors.index.json maps the frozen
embed_in + layers 0..2 to ../model/model-00001-of-00003.safetensors. Any loader that reads sharded hub
checkpoints (neoxlite's, transformers') loads a head folder as one ordinary checkpoint.

Re-running `lm` invalidates the heads (they record the sha256 of the shared shard); run `heads` after it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import demo_data as dd  # noqa: E402

from neoxlite.config import GPTNeoXConfig  # noqa: E402
from neoxlite.fileio import atomic_folder, atomic_write_text  # noqa: E402
from neoxlite.model import (  # noqa: E402
    GPTNeoXForCausalLM,
    GPTNeoXForQuestionAnswering,
    GPTNeoXForSequenceClassification,
    GPTNeoXForTokenClassification,
    GPTNeoXPreTrainedModel,
)

WORK = HERE / "work"
DEMO = ROOT / "neoxlite" / "demo"
REPORT = HERE / "demo_report.md"
SEED = 1234
THREADS = 2
EOS, PAD = 0, 1

# --- the model: 6.8M parameters, 13.7 MB in fp16
VOCAB = 4096  # on 2 cores compute is the limit: 4096 costs ~8% more tokens per byte than 8192 but trains ~25% faster per token
MODEL = {
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,  # head size 32
    "intermediate_size": 1024,
    "hidden_act": "gelu",
    "rotary_pct": 0.5,  # 16 of 32 dims per head rotate
    "rotary_emb_base": 10000,
    "max_position_embeddings": 512,  # = the training context
    "layer_norm_eps": 1e-5,
    "use_parallel_residual": True,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "classifier_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": EOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
    "use_cache": True,
}
# --- language-model training: 2400 steps x 4 x 512 tokens = 4.9M tokens (about 1.8 epochs of the train split)
LM_STEPS, LM_BATCH, LM_SEQ = 2400, 4, 512
BREAK_RATE = 0.1  # share of newlines encoded as a prompt's last token would be (see encode_with_line_breaks)
LM_LR, LM_MIN_LR, LM_WARMUP, WEIGHT_DECAY = 2e-3, 2e-4, 100, 0.1
# --- heads: fine-tune layers FROZEN_BELOW.. + final layer norm + head
FROZEN_BELOW = 3
HEAD_LR, HEAD_WARMUP = 1e-3, 30
SHARED_SHARD = "model-00001-of-00003.safetensors"
HEAD_SHARD = "model-head.safetensors"
EVAL_SEQ, EVAL_STRIDE = 512, 256  # held-out LM loss: every token scored once with >= 256 tokens of context


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """Wall-clock and CPU minutes of a stage (the machine is shared: CPU time is the comparable cost)."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.wall0, self.cpu0 = time.time() - wall, time.process_time() - cpu

    def elapsed(self) -> tuple[float, float]:
        return time.time() - self.wall0, time.process_time() - self.cpu0

    def record(self, stage: str) -> None:
        wall, cpu = self.elapsed()
        path = WORK / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[stage] = {"wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2)}
        atomic_write_text(path, json.dumps(timings, indent=1) + "\n")


# ============================================================================ tokenizer


def train_tokenizer(train: list[dd.SourceFile]) -> Tokenizer:
    """Byte-level BPE in GPT-NeoX's tokenizer.json layout: NFC, ByteLevel pre-tokenizer/decoder, ids 0/1 special."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.text for f in train), trainer=trainer)
    assert tok.token_to_id("<|endoftext|>") == EOS and tok.token_to_id("<|padding|>") == PAD
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "GPTNeoXTokenizer",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|padding|>",
    "add_bos_token": False,
    "add_eos_token": False,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,  # code: never glue " ." back together
    "model_max_length": MODEL["max_position_embeddings"],
}


def write_tokenizer_files(folder: Path) -> None:
    shutil.copyfile(WORK / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    special = {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(WORK / "tokenizer.json"))


def encode_files(tok: Tokenizer, files: list[dd.SourceFile]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch([f.text for f in files], add_special_tokens=False)]


# ============================================================================ language model


def lm_config() -> dict:
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **MODEL, "torch_dtype": "float16"}


def new_lm() -> GPTNeoXForCausalLM:
    torch.manual_seed(SEED)
    model = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(lm_config()))
    model.init_weights(MODEL["initializer_range"])
    # GPT-2 style: residual-branch outputs scaled down by sqrt(2 * layers)
    for name, p in model.named_parameters():
        if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            p.data.mul_(1 / math.sqrt(2 * MODEL["num_hidden_layers"]))
    return model.float()


def lr_at(step: int, steps: int, peak: float, floor: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], lr: float) -> torch.optim.AdamW:
    decay = [p for n, p in params if p.dim() == 2 and "embed_in" not in n]
    rest = [p for n, p in params if not (p.dim() == 2 and "embed_in" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def encode_with_line_breaks(tok: Tokenizer, files: list[dd.SourceFile], rate: float = BREAK_RATE) -> list[list[int]]:
    """Training encoding: at a random `rate` of newlines the text is cut and both sides encoded apart.

    Like GPT-NeoX's, the tokenizer merges a newline with the next line's indentation ("\n    "), so a
    prompt that ends with a newline ends in a token that, in canonically encoded text, is never followed by
    indentation: the model would always continue at column 0. Seeing some lines encoded as a prompt ends
    ("\n" then "   ", " x") teaches it to indent after them. Held-out numbers use the plain encoding.
    """
    rng = random.Random(SEED)
    pieces, owner = [], []
    for i, f in enumerate(files):
        start = 0
        for pos, ch in enumerate(f.text):
            if ch == "\n" and rng.random() < rate:
                pieces.append(f.text[start : pos + 1])
                owner.append(i)
                start = pos + 1
        pieces.append(f.text[start:])
        owner.append(i)
    docs: list[list[int]] = [[] for _ in files]
    for i, enc in zip(owner, tok.encode_batch(pieces, add_special_tokens=False), strict=True):
        docs[i].extend(enc.ids)
    return docs


def stream_of(docs: list[list[int]]) -> torch.Tensor:
    """Documents joined as <|endoftext|> doc <|endoftext|> doc ..."""
    out: list[int] = []
    for ids in docs:
        out.append(EOS)
        out.extend(ids)
    return torch.tensor(out, dtype=torch.long)


def lm_batch(stream: torch.Tensor, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED * 100_003 + step)  # batch depends on the step only: resumable
    starts = torch.randint(0, len(stream) - LM_SEQ, (LM_BATCH,), generator=g)
    return torch.stack([stream[s : s + LM_SEQ] for s in starts.tolist()])


def eval_windows(ids: list[int], seq: int, stride: int) -> Iterator[tuple[list[int], int]]:
    """(window, first scored position) covering one document; every target scored exactly once.

    The document is prefixed with <|endoftext|> (as in training), so its first token is predicted too.
    Position i of a window predicts window[i + 1]; positions before `first` are context only.
    """
    seq_ids = [EOS, *ids]
    n_targets = len(seq_ids) - 1
    begin, scored = 0, 0
    while scored < n_targets:
        end = min(begin + seq, n_targets)  # inputs seq_ids[begin:end] predict seq_ids[begin + 1:end + 1]
        yield seq_ids[begin : end + 1], scored - begin
        scored = end
        begin = max(0, end - (seq - stride))


@torch.inference_mode()
def lm_nll(model: GPTNeoXForCausalLM, docs: list[list[int]], batch: int = 8) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `docs` and the number of tokens scored."""
    windows = [w for ids in docs for w in eval_windows(ids, EVAL_SEQ, EVAL_STRIDE)]
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        width = max(len(w) for w, _ in chunk) - 1
        x = torch.full((len(chunk), width), PAD, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (w, first) in enumerate(chunk):
            x[r, : len(w) - 1] = torch.tensor(w[:-1])
            y[r, first : len(w) - 1] = torch.tensor(w[1 + first :])
        logits = model(x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total += float(nll)
        count += int((y != -100).sum())
    return total, count


def train_lm(steps: int = LM_STEPS) -> None:
    clock = Clock()
    train, held = dd.split(dd.corpus())
    tok = load_tokenizer()
    stream = stream_of(encode_with_line_breaks(tok, train))
    held_docs = encode_files(tok, held)
    probe = [d[:2000] for d in held_docs[:8]]  # quick held-out probe during training
    log(f"train stream {len(stream):,} tokens; {steps} steps x {LM_BATCH} x {LM_SEQ} = {steps * LM_BATCH * LM_SEQ:,} tokens")
    model = new_lm()
    model.train()
    params = list(model.named_parameters())
    opt = make_optimizer(params, LM_LR)
    ckpt = WORK / "lm_state.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        clock = Clock(state["wall"], state["cpu"])
        log(f"resumed at step {start}")
    t_last, losses = time.time(), []
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, LM_LR, LM_MIN_LR, LM_WARMUP)
        x = lm_batch(stream, step)
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 20 == 0:
            dt = time.time() - t_last
            log(f"step {step + 1}/{steps} loss {sum(losses) / len(losses):.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{20 * LM_BATCH * LM_SEQ / dt:.0f} tok/s")
            t_last, losses = time.time(), []
        if (step + 1) % 100 == 0 or step + 1 == steps:
            model.eval()
            nll, n = lm_nll(model, probe)
            model.train()
            log(f"  held-out probe loss {nll / n:.3f}")
            tmp = ckpt.with_suffix(".tmp")
            wall, cpu = clock.elapsed()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1, "wall": wall, "cpu": cpu}, tmp)
            tmp.replace(ckpt)
    model.eval()
    export_base(model)
    clock.record("lm")


def export_from_state(steps: int = LM_STEPS) -> None:
    """Writes neoxlite/demo/model again from the finished training state (e.g. after changing the shard split)."""
    state = torch.load(WORK / "lm_state.pt", weights_only=True)
    if state["step"] != steps:
        raise ValueError(f"tools/work/lm_state.pt stopped at step {state['step']} of {steps}; finish `lm` first")
    model = new_lm()
    model.load_state_dict(state["model"])
    export_base(model.eval())


def _fp16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to(torch.float16).contiguous() for n, p in model.named_parameters()}


def _is_shared(key: str) -> bool:
    """Tensors of the frozen part every head shares with the base: embed_in and layers below FROZEN_BELOW."""
    if key.startswith("gpt_neox.embed_in."):
        return True
    if key.startswith("gpt_neox.layers."):
        return int(key.split(".")[2]) < FROZEN_BELOW
    return False


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_base(model: GPTNeoXForCausalLM) -> None:
    state = _fp16_state(model)
    shards = {
        SHARED_SHARD: {k: v for k, v in state.items() if _is_shared(k)},
        "model-00002-of-00003.safetensors": {k: v for k, v in state.items() if k.startswith("gpt_neox.") and not _is_shared(k)},
        "model-00003-of-00003.safetensors": {k: v for k, v in state.items() if not k.startswith("gpt_neox.")},
    }
    assert sum(len(s) for s in shards.values()) == len(state)
    with atomic_folder(DEMO / "model", overwrite=True) as tmp:
        for name, tensors in shards.items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        total = sum(v.numel() * v.element_size() for v in state.values())
        weight_map = {k: name for name, tensors in shards.items() for k in tensors}
        _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", lm_config())
        _write_json(tmp / "generation_config.json", {"bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": PAD})
        write_tokenizer_files(tmp)
        _world_readable(tmp)
    log(f"wrote {DEMO / 'model'} ({total / 1e6:.1f} MB)")


def _world_readable(folder: Path) -> None:
    """safetensors writes its files 0600; package data must be readable by everyone who imports neoxlite."""
    for f in folder.iterdir():
        f.chmod(0o644)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ============================================================================ heads


def load_base_into(head: GPTNeoXPreTrainedModel) -> None:
    """Copies the shipped fp16 base (so the frozen part equals what the head folder will point at)."""
    base = GPTNeoXForCausalLM.from_pretrained(DEMO / "model", dtype=torch.float32, progress=False)
    core = {k: v for k, v in base.state_dict().items() if k.startswith("gpt_neox.")}
    missing, unexpected = head.load_state_dict(core, strict=False)
    assert not unexpected and all(not k.startswith("gpt_neox.") for k in missing), (missing, unexpected)


def new_head(cls: type[GPTNeoXPreTrainedModel], architecture: str, labels: list[str] | None) -> tuple[GPTNeoXPreTrainedModel, dict]:
    config = {**lm_config(), "architectures": [architecture]}
    if labels is not None:
        config["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config["label2id"] = {name: i for i, name in enumerate(labels)}
        config["num_labels"] = len(labels)
    torch.manual_seed(SEED)
    model = cls(GPTNeoXConfig.from_dict(config))
    model.init_weights(MODEL["initializer_range"])
    model.float()
    load_base_into(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not _is_shared(name))
    model.eval()  # no dropout anywhere: the config's dropouts are 0
    return model, config


def finetune(model: GPTNeoXPreTrainedModel, steps: int, loss_of_step: Callable[[int], torch.Tensor], name: str) -> None:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_optimizer(params, HEAD_LR)
    t_last, losses = time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, HEAD_LR, HEAD_LR / 10, HEAD_WARMUP)
        loss = loss_of_step(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            log(f"{name} step {step + 1}/{steps} loss {sum(losses) / len(losses):.4f} ({time.time() - t_last:.0f}s)")
            t_last, losses = time.time(), []


def export_head(model: GPTNeoXPreTrainedModel, config: dict, task: str) -> None:
    state = _fp16_state(model)
    base_shard = DEMO / "model" / SHARED_SHARD
    from safetensors import safe_open

    with safe_open(str(base_shard), "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            assert torch.equal(f.get_tensor(k), state[k]), f"{k} drifted from the base"
    own = {k: v for k, v in state.items() if not _is_shared(k)}
    shared = [k for k in state if _is_shared(k)]
    with atomic_folder(DEMO / task, overwrite=True) as tmp:
        save_file(own, str(tmp / HEAD_SHARD), metadata={"format": "pt"})
        weight_map = {**dict.fromkeys(shared, f"../model/{SHARED_SHARD}"), **dict.fromkeys(own, HEAD_SHARD)}
        total = sum(v.numel() * v.element_size() for v in state.values())
        meta = {"total_size": total, "base_shard_sha256": _sha256(base_shard)}
        _write_json(tmp / "model.safetensors.index.json", {"metadata": meta, "weight_map": weight_map})
        _write_json(tmp / "config.json", config)
        write_tokenizer_files(tmp)
        _world_readable(tmp)
    log(f"wrote {DEMO / task} ({sum(v.numel() * 2 for v in own.values()) / 1e6:.1f} MB of its own)")


def pad_batch(rows: list[list[int]], fill: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return x, mask


# ---------------------------------------------------------------------------- token classification

TOKCLS_STEPS, TOKCLS_BATCH, TOKCLS_SEQ, TOKCLS_WARMUP = 300, 8, 256, 32


@dataclass
class TokenDoc:
    ids: list[int]
    labels: list[int]
    snippet_starts: list[int]  # tokens that begin a column-0 logical line


def token_labels(tok: Tokenizer, text: str) -> TokenDoc | None:
    """Label per token: the tokenize type of the token's first character that is not a space or tab."""
    text = unicodedata.normalize("NFC", text)
    chars = dd.char_token_types(text)
    if chars is None:
        return None
    ids = tok.encode(text, add_special_tokens=False).ids
    char_of_byte = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
    labels, token_at_char, pos = [], {}, 0
    for t, tid in enumerate(ids):
        n = len(tok.id_to_token(tid))  # one char per byte in the ByteLevel alphabet
        span = range(char_of_byte[pos], char_of_byte[pos + n - 1] + 1)
        first = next((c for c in span if text[c] not in " \t"), span[0])
        labels.append(chars[first])
        token_at_char[span[0]] = t
        pos += n
    if pos != len(char_of_byte):
        return None
    starts = [token_at_char[c] for c in dd.top_level_starts(text) if c in token_at_char]
    return TokenDoc(ids, labels, starts)


def token_dataset(tok: Tokenizer, files: list[dd.SourceFile]) -> list[TokenDoc]:
    return [d for f in files if (d := token_labels(tok, f.text)) is not None]


def train_token_head(tok: Tokenizer, train: list[dd.SourceFile]) -> GPTNeoXForTokenClassification:
    """Windows of TOKCLS_SEQ tokens: half start anywhere in a file, half at a column-0 line with no context
    before it, as a snippet pasted into the app does. A window cut at a random place starts mid-statement
    (the "x" of "0x1f"), so its first TOKCLS_WARMUP tokens are not scored: the first tokens of an input
    are learned from real line starts only."""
    data = token_dataset(tok, train)
    ids = torch.tensor([t for d in data for t in [EOS, *d.ids]])
    labs = torch.tensor([t for d in data for t in [-100, *d.labels]])
    snippet_starts, offset = [], 0
    for d in data:
        snippet_starts += [offset + 1 + s for s in d.snippet_starts if offset + 1 + s + TOKCLS_SEQ <= len(ids)]
        offset += 1 + len(d.ids)
    model, config = new_head(GPTNeoXForTokenClassification, "GPTNeoXForTokenClassification", dd.TOKEN_LABELS)

    def step_loss(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(SEED * 7 + step)
        half = TOKCLS_BATCH // 2
        starts = torch.randint(0, len(ids) - TOKCLS_SEQ, (TOKCLS_BATCH - half,), generator=g).tolist()
        starts += [snippet_starts[i] for i in torch.randint(0, len(snippet_starts), (half,), generator=g).tolist()]
        x = torch.stack([ids[s : s + TOKCLS_SEQ] for s in starts])
        y = torch.stack([labs[s : s + TOKCLS_SEQ] for s in starts])
        y[: TOKCLS_BATCH - half, :TOKCLS_WARMUP] = -100
        return model(x, labels=y).loss

    finetune(model, TOKCLS_STEPS, step_loss, "token-classification")
    export_head(model, config, "token-classification")
    return model


# ---------------------------------------------------------------------------- sequence classification

SEQCLS_STEPS, SEQCLS_BATCH, SEQCLS_PER_LABEL, SEQCLS_MAX_TOKENS = 300, 32, 12, 128


def encode_chunks(tok: Tokenizer, examples: list[tuple[str, int]]) -> list[tuple[list[int], int]]:
    enc = tok.encode_batch([c for c, _ in examples], add_special_tokens=False)
    return [(e.ids[:SEQCLS_MAX_TOKENS], lab) for e, (_, lab) in zip(enc, examples, strict=True)]


def train_sequence_head(tok: Tokenizer, train: list[dd.SourceFile]) -> GPTNeoXForSequenceClassification:
    data = encode_chunks(tok, dd.seq_examples(train, SEQCLS_PER_LABEL, SEED))
    log(f"sequence-classification: {len(data)} training chunks, {Counter(dd.SEQ_LABELS[lab] for _, lab in data)}")
    model, config = new_head(GPTNeoXForSequenceClassification, "GPTNeoXForSequenceClassification", dd.SEQ_LABELS)
    order = list(range(len(data)))
    random.Random(SEED).shuffle(order)

    def step_loss(step: int) -> torch.Tensor:
        rows = [data[order[(step * SEQCLS_BATCH + i) % len(order)]] for i in range(SEQCLS_BATCH)]
        x, mask = pad_batch([r for r, _ in rows])
        return model(x, attention_mask=mask, labels=torch.tensor([lab for _, lab in rows])).loss

    finetune(model, SEQCLS_STEPS, step_loss, "sequence-classification")
    export_head(model, config, "sequence-classification")
    return model


# ---------------------------------------------------------------------------- question answering

QA_STEPS, QA_BATCH = 800, 8


def qa_features(tok: Tokenizer, ex: dd.QAExample) -> tuple[list[int], list[int], int, int]:
    """(question ids, context ids, start token, end token) with token indices into the context ids.

    Layout as the app builds it: tokens of question + "\\n", then tokens of the context. The answer span
    ends at the newline token after the return expression when there is one (a causal model cannot see
    that the expression stopped until the newline arrives), else at the expression's last token.
    """
    q = tok.encode(ex.question.strip() + "\n", add_special_tokens=False).ids
    enc = tok.encode(ex.context, add_special_tokens=False)
    c = enc.ids
    # character offset of every token from the bytes it holds (offsets from `tokenizers` are trimmed)
    starts, pos = [], 0
    text_bytes = [len(ch.encode("utf-8")) for ch in ex.context]
    char_at_byte = [i for i, n in enumerate(text_bytes) for _ in range(n)]
    for tid in c:
        starts.append(char_at_byte[pos])
        pos += len(tok.id_to_token(tid))

    def token_at(char: int) -> int:
        return max(i for i, s in enumerate(starts) if s <= char)

    a0 = ex.answer_start
    a1 = a0 + len(ex.answer)  # first char after the answer: "\n" or the end of the context
    return q, c, token_at(a0), token_at(a1 if a1 < len(ex.context) else a1 - 1)


def train_qa_head(tok: Tokenizer, train: list[dd.SourceFile]) -> GPTNeoXForQuestionAnswering:
    feats = [qa_features(tok, ex) for ex in dd.qa_examples(train, SEED)]
    feats = [f for f in feats if len(f[0]) + len(f[1]) <= MODEL["max_position_embeddings"]]
    log(f"question-answering: {len(feats)} training examples")
    model, config = new_head(GPTNeoXForQuestionAnswering, "GPTNeoXForQuestionAnswering", None)
    order = list(range(len(feats)))
    random.Random(SEED).shuffle(order)

    def step_loss(step: int) -> torch.Tensor:
        rows = [feats[order[(step * QA_BATCH + i) % len(order)]] for i in range(QA_BATCH)]
        x, mask = pad_batch([q + c for q, c, _, _ in rows])
        s = torch.tensor([len(q) + s for q, _, s, _ in rows])
        e = torch.tensor([len(q) + e for q, _, _, e in rows])
        out = model(x, attention_mask=mask)
        # only context tokens can start or end the answer
        allowed = mask.bool().clone()
        for i, (q, _, _, _) in enumerate(rows):
            allowed[i, : len(q)] = False
        start = out.start_logits.float().masked_fill(~allowed, -1e4)
        end = out.end_logits.float().masked_fill(~allowed, -1e4)
        f = torch.nn.functional.cross_entropy
        return (f(start, s) + f(end, e)) / 2

    finetune(model, QA_STEPS, step_loss, "question-answering")
    export_head(model, config, "question-answering")
    return model


def train_heads(only: list[str] | None = None) -> None:
    train, _ = dd.split(dd.corpus())
    tok = load_tokenizer()
    for name, fn in (("token-classification", train_token_head), ("sequence-classification", train_sequence_head),
                     ("question-answering", train_qa_head)):
        if only and name not in only:
            continue
        clock = Clock()
        fn(tok, train)
        clock.record(name)


# ============================================================================ report

MAX_ANSWER_TOKENS = 64  # as the app
PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    'import os\n\n\ndef list_python_files(root):\n    """Return the paths of the .py files under root."""\n',
    'class Stack:\n    """A last-in, first-out container."""\n\n    def __init__(self):\n        self.items = []\n\n'
    "    def push(self, item):\n",
]
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 40, "seed": 0, "max_new_tokens": 64}


def gzip_bits_per_byte(texts: list[str]) -> tuple[float, float]:
    """gzip -9 on each file separately, and on all of them concatenated (kinder to gzip): bits per byte."""
    raw = [t.encode("utf-8") for t in texts]

    def gz(data: bytes) -> int:
        if shutil.which("gzip"):
            return len(subprocess.run(["gzip", "-9", "-c", "-n"], input=data, capture_output=True, check=True).stdout)
        return len(gzip.compress(data, compresslevel=9, mtime=0))

    n = sum(len(r) for r in raw)
    return 8 * sum(gz(r) for r in raw) / n, 8 * gz(b"".join(raw)) / n


SNIPPET_TOKENS = 64


@torch.inference_mode()
def eval_token_head(model: GPTNeoXForTokenClassification, data: list[TokenDoc], baseline: dict[int, int],
                    majority: int) -> dict:
    """Accuracy in running text (windows of 256, each token with up to 128 tokens of context before its
    half) and on snippets (the first SNIPPET_TOKENS tokens from each column-0 line, with no context)."""
    per: Counter = Counter()
    per_total: Counter = Counter()
    correct = base_correct = total = 0
    for d in data:
        for begin in range(0, len(d.ids), 128):
            ctx = max(0, begin - 128)
            x = torch.tensor([d.ids[ctx : begin + 128]])
            pred = model(x).logits[0, begin - ctx :].argmax(-1).tolist()
            for j, p in enumerate(pred):
                gold = d.labels[begin + j]
                correct += p == gold
                base_correct += baseline.get(d.ids[begin + j], majority) == gold
                per[gold] += p == gold
                per_total[gold] += 1
                total += 1
    snippets = [(d.ids[s : s + SNIPPET_TOKENS], d.labels[s : s + SNIPPET_TOKENS]) for d in data for s in d.snippet_starts]
    snip_correct = snip_total = 0
    for i in range(0, len(snippets), 32):
        rows = snippets[i : i + 32]
        x, mask = pad_batch([r for r, _ in rows])
        pred = model(x, attention_mask=mask).logits.argmax(-1)
        for r, (_, gold) in enumerate(rows):
            snip_correct += int((pred[r, : len(gold)] == torch.tensor(gold)).sum())
            snip_total += len(gold)
    return {
        "accuracy": correct / total,
        "tokens": total,
        "baseline_accuracy": base_correct / total,
        "per_label": {dd.TOKEN_LABELS[k]: round(per[k] / per_total[k], 4) for k in sorted(per_total)},
        "snippet_accuracy": snip_correct / snip_total,
        "snippets": len(snippets),
        "snippet_tokens": snip_total,
    }


@torch.inference_mode()
def eval_sequence_head(model: GPTNeoXForSequenceClassification, data: list[tuple[list[int], int]]) -> dict:
    correct, per, per_total = 0, Counter(), Counter()
    for i in range(0, len(data), 32):
        rows = data[i : i + 32]
        x, mask = pad_batch([r for r, _ in rows])
        pred = model(x, attention_mask=mask).logits.argmax(-1).tolist()
        for p, (_, gold) in zip(pred, rows, strict=True):
            correct += p == gold
            per[gold] += p == gold
            per_total[gold] += 1
    majority = max(per_total.values()) / len(data)
    return {
        "accuracy": correct / len(data),
        "examples": len(data),
        "majority_class_accuracy": majority,
        "per_label": {dd.SEQ_LABELS[k]: round(per[k] / per_total[k], 4) for k in sorted(per_total)},
    }


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor) -> tuple[int, int]:
    """The app's search: argmax of log p(start=i) + log p(end=j) over i <= j < i + MAX_ANSWER_TOKENS."""
    s = start_logits.float().log_softmax(-1)
    e = end_logits.float().log_softmax(-1)
    pair = s[:, None] + e[None, :]
    n = pair.shape[0]
    ok = torch.ones(n, n, dtype=torch.bool).triu() & torch.ones(n, n, dtype=torch.bool).tril(MAX_ANSWER_TOKENS - 1)
    i, j = divmod(int(pair.masked_fill(~ok, float("-inf")).argmax()), n)
    return i, j


@torch.inference_mode()
def eval_qa_head(model: GPTNeoXForQuestionAnswering, tok: Tokenizer, examples: list[dd.QAExample]) -> dict:
    exact = exact_single = n_single = 0
    for ex in examples:
        q, c, _, _ = qa_features(tok, ex)
        out = model(torch.tensor([q + c]))
        i, j = best_span(out.start_logits[0, len(q) :], out.end_logits[0, len(q) :])
        hit = tok.decode(c[i : j + 1]).strip() == ex.answer
        exact += hit
        if ex.context.count("\ndef ") + ex.context.startswith("def ") <= 1:
            exact_single += hit
            n_single += 1
    return {
        "exact_match": exact / len(examples),
        "examples": len(examples),
        "exact_match_one_function": exact_single / max(1, n_single),
        "examples_one_function": n_single,
    }


def report() -> None:
    clock = Clock()
    from neoxlite.tokenizer import GPTNeoXTokenizerFast

    files = dd.corpus()
    train, held = dd.split(files)
    split = dd.split_info(files)
    tok = load_tokenizer()
    results: dict = {"python": split["python"]}

    # --- language model, loaded like any hub checkpoint
    lm = GPTNeoXForCausalLM.from_pretrained(DEMO / "model", dtype=torch.float32, progress=False)
    held_docs = encode_files(tok, held)
    nll, n_tok = lm_nll(lm, held_docs)
    n_bytes = sum(len(f.text.encode("utf-8")) for f in held)
    gz_files, gz_all = gzip_bits_per_byte([f.text for f in held])
    results["lm"] = {
        "held_out_files": len(held), "held_out_bytes": n_bytes, "held_out_tokens": n_tok,
        "loss_nats_per_token": nll / n_tok, "bits_per_byte": nll / math.log(2) / n_bytes,
        "gzip9_bits_per_byte_per_file": gz_files, "gzip9_bits_per_byte_concatenated": gz_all,
        "parameters": sum(p.numel() for p in lm.parameters()),
    }
    log(f"lm: {results['lm']}")
    hf_tok = GPTNeoXTokenizerFast.from_pretrained(DEMO / "model")
    samples = []
    for prompt in PROMPTS:
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        out = lm.generate(ids, **SAMPLING)
        samples.append((prompt, hf_tok.decode(out[0, ids.shape[1] :])))
    settings = ", ".join(f"{k}={v}" for k, v in SAMPLING.items())
    results["samples"] = {"settings": f"model.generate(ids, {settings})", "completions": samples}

    # --- heads, each loaded from its folder with from_pretrained
    tc = GPTNeoXForTokenClassification.from_pretrained(DEMO / "token-classification", dtype=torch.float32, progress=False)
    train_tok, held_tok = token_dataset(tok, train), token_dataset(tok, held)
    votes: dict[int, Counter] = {}
    for d in train_tok:
        for t, lab in zip(d.ids, d.labels, strict=True):
            votes.setdefault(t, Counter())[lab] += 1
    baseline = {t: c.most_common(1)[0][0] for t, c in votes.items()}
    majority = Counter(lab for d in train_tok for lab in d.labels).most_common(1)[0][0]
    results["token-classification"] = eval_token_head(tc, held_tok, baseline, majority)
    log(f"token-classification: {results['token-classification']}")

    sc = GPTNeoXForSequenceClassification.from_pretrained(DEMO / "sequence-classification", dtype=torch.float32, progress=False)
    held_seq = encode_chunks(tok, dd.seq_examples(held, SEQCLS_PER_LABEL, SEED))
    results["sequence-classification"] = eval_sequence_head(sc, held_seq)
    log(f"sequence-classification: {results['sequence-classification']}")

    qa = GPTNeoXForQuestionAnswering.from_pretrained(DEMO / "question-answering", dtype=torch.float32, progress=False)
    results["question-answering"] = eval_qa_head(qa, tok, dd.qa_examples(held, SEED))
    log(f"question-answering: {results['question-answering']}")

    clock.record("report")
    results["minutes"] = json.loads((WORK / "timings.json").read_text())
    results["sizes_mb"] = {p.name: round(sum(f.stat().st_size for f in p.iterdir()) / 1e6, 2)
                           for p in sorted(DEMO.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))}
    atomic_write_text(WORK / "report.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(REPORT, render_report(results, split))
    log(f"wrote {REPORT}")


def render_report(r: dict, split: dict) -> str:
    lm, tc, sc, qa = r["lm"], r["token-classification"], r["sequence-classification"], r["question-answering"]
    minutes = r["minutes"]
    wall = sum(m["wall_minutes"] for m in minutes.values())
    cpu = sum(m["cpu_minutes"] for m in minutes.values())
    lines = [
        "# The built-in demo model: held-out numbers",
        "",
        f"Produced by `python tools/train_demo.py all` (Python {r['python']} standard library, CPU, 2 threads, seed {SEED}).",
        f"Held out: {split['held_out_files']} files ({split['held_out_bytes'] / 1e6:.2f} MB; list in `tools/demo_split.json`),"
        f" chosen by a hash of their path; trained on the other {split['train_files']} ({split['train_bytes'] / 1e6:.2f} MB).",
        "",
        "## Language model",
        "",
        f"GPT-NeoX, {lm['parameters'] / 1e6:.1f}M parameters ({MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_attention_heads']} heads, context {MODEL['max_position_embeddings']}), byte-level BPE with {VOCAB} tokens, "
        f"{LM_STEPS * LM_BATCH * LM_SEQ / 1e6:.1f}M training tokens ({LM_STEPS} steps of {LM_BATCH} x {LM_SEQ}, AdamW, "
        f"peak lr {LM_LR}, cosine), shipped in fp16. All numbers below come from the shipped fp16 folders, "
        "loaded with `from_pretrained` like any hub checkpoint.",
        "",
        "| held-out stdlib files | bits per byte |",
        "|---|---|",
        f"| demo model (loss {lm['loss_nats_per_token']:.3f} nats/token over {lm['held_out_tokens']:,} tokens) | **{lm['bits_per_byte']:.3f}** |",
        f"| `gzip -9`, all files concatenated | {lm['gzip9_bits_per_byte_concatenated']:.3f} |",
        f"| `gzip -9`, each file on its own | {lm['gzip9_bits_per_byte_per_file']:.3f} |",
        "",
        f"Bits per byte = total loss in bits / {lm['held_out_bytes']:,} UTF-8 bytes of the files. Each file starts "
        f"after `<|endoftext|>` as in training; every token is scored once, with all of the file before it or at least "
        f"{EVAL_SEQ - EVAL_STRIDE} tokens of it as context (windows of {EVAL_SEQ}, stride {EVAL_STRIDE}).",
        "",
        "## Heads (held-out files)",
        "",
        f"Each head fine-tunes layers {FROZEN_BELOW}-{MODEL['num_hidden_layers'] - 1}, the final layer norm and its "
        f"output layer on the frozen base, and ships only those ({HEAD_SHARD}); labels come from `tokenize` and `ast` "
        "run on the same files (tools/demo_data.py), nothing is hand-labelled.",
        "",
        "| head | task | held-out result | reference |",
        "|---|---|---|---|",
        f"| token-classification | type of each token per Python's `tokenize` ({', '.join(dd.TOKEN_LABELS)}) | "
        f"{100 * tc['accuracy']:.1f}% of {tc['tokens']:,} tokens in running text; {100 * tc['snippet_accuracy']:.1f}% "
        f"on {tc['snippets']:,} snippets (first {SNIPPET_TOKENS} tokens from a column-0 line, no context) | "
        f"most frequent type per token id: {100 * tc['baseline_accuracy']:.1f}% |",
        f"| sequence-classification | kind of statement a 1-4 line chunk starts with ({', '.join(dd.SEQ_LABELS)}) | "
        f"{100 * sc['accuracy']:.1f}% of {sc['examples']:,} chunks | majority class: {100 * sc['majority_class_accuracy']:.1f}% |",
        f"| question-answering | \"What does NAME return?\" over 1-3 functions -> its return expression | "
        f"{100 * qa['exact_match']:.1f}% exact match of {qa['examples']} | one-function contexts: "
        f"{100 * qa['exact_match_one_function']:.1f}% of {qa['examples_one_function']} |",
        "",
        "Per-label accuracy, token classification: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in tc["per_label"].items()) + ".",
        "Per-label accuracy, sequence classification: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sc["per_label"].items()) + ".",
        "",
        "## Sample completions",
        "",
        f"({r['samples']['settings']}; the prompt is shown before the `▌`)",
        "",
    ]
    for prompt, completion in r["samples"]["completions"]:
        lines += ["```python", prompt + "▌" + completion, "```", ""]
    lines += [
        "## Cost",
        "",
        "Measured on a shared 2-core machine; CPU minutes (process time, both threads) are the comparable cost,",
        "wall minutes depend on what else ran.",
        "",
        "| stage | wall minutes | CPU minutes |",
        "|---|---|---|",
        *[f"| {k} | {v['wall_minutes']:.1f} | {v['cpu_minutes']:.1f} |" for k, v in minutes.items()],
        f"| total | {wall:.1f} | {cpu:.1f} |",
        "",
        "Sizes in the package (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in r["sizes_mb"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


# ============================================================================ main


def stage_tokenizer() -> None:
    clock = Clock()
    train, _ = dd.split(dd.corpus())
    info = dd.write_split(dd.corpus())
    log(f"corpus: {info['train_files']} train files, {info['held_out_files']} held out")
    tok = train_tokenizer(train)
    tok.save(str(WORK / "tokenizer.json"))
    clock.record("tokenizer")
    log(f"tokenizer: {tok.get_vocab_size()} tokens -> {WORK / 'tokenizer.json'}")


def main() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        # On a shared machine OpenMP's spin-waiting threads burn their time slices waiting for each other:
        # measured here, a training step took 6.6 CPU-seconds with 2 spinning threads and 0.94 with passive
        # waiting. The policy is read when OpenMP starts, so restart the interpreter with it set.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["all", "tokenizer", "lm", "export", "heads", "report"])
    parser.add_argument("--lm-steps", type=int, default=LM_STEPS, help="optimizer steps for the language model")
    parser.add_argument("--head", action="append", choices=["token-classification", "sequence-classification",
                        "question-answering"], help="with `heads`: train only this head (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    WORK.mkdir(parents=True, exist_ok=True)
    stages = ["tokenizer", "lm", "heads", "report"] if args.stage == "all" else [args.stage]
    for stage in stages:
        log(f"=== {stage}")
        if stage == "tokenizer":
            stage_tokenizer()
        elif stage == "lm":
            train_lm(args.lm_steps)
        elif stage == "export":
            export_from_state(args.lm_steps)
        elif stage == "heads":
            train_heads(args.head)
        else:
            report()


if __name__ == "__main__":
    main()
