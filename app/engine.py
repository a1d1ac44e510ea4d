"""The models behind the app: each checkpoint loaded once, every request run on them, memory reported.

Nothing here knows Gradio: user mistakes raise ValueError, and `app.ui` turns them into messages.
Which tabs exist follows each checkpoint's `config.json` `architectures`; a checkpoint given with
`--head` adds its head next to the chat model.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from neoxlite.app import prompting

from neoxlite.config import GPTNeoXConfig
from neoxlite.generation import context_limit
from neoxlite.limits import check_text_fits, lone_surrogate, max_text_bytes
from neoxlite.options import DEFAULT_SAMPLING, sampling_kwargs

# architecture (config.json) -> task, in the order the tabs appear
TASKS = {
    "GPTNeoXForCausalLM": "chat",
    "GPTNeoXForSequenceClassification": "classify",
    "GPTNeoXForTokenClassification": "tag",
    "GPTNeoXForQuestionAnswering": "answer",
}
TASK_TITLES = {
    "chat": "Chat",
    "classify": "Sequence classification",
    "tag": "Token classification",
    "answer": "Question answering",
}
MAX_ANSWER_TOKENS = 64  # longest answer span the QA head may pick
MAX_SEED = 2**63 - 1  # the random generators take a signed 64-bit seed


def check_text(text: Any, what: str, required: bool = True) -> str:
    """`text` when it is text someone typed: ValueError naming `what` for a lone surrogate (half of a UTF-16
    pair, which no UTF-8 text holds), for what is not text, and when `required`, for nothing (None, blanks)."""
    if required and (not isinstance(text, str) or not text.strip()):
        raise ValueError(f"Enter the {what} first.")
    if not isinstance(text, str):
        raise TypeError(f"the {what} must be text, not {type(text).__name__}")
    at = lone_surrogate(text)
    if at is not None:
        raise ValueError(f"the {what} is not valid Unicode: character {at} is a lone surrogate "
                         f"({text[at]!r}); retype or paste it again")
    return text


@dataclass
class Source:
    """One checkpoint the app serves: where it is and which task its head does."""

    name: str  # as the page shows it: hub id or folder name, never an absolute path (models.display_name)
    folder: Path  # resolved local folder
    config: GPTNeoXConfig

    @property
    def architecture(self) -> str:
        return (self.config.architectures or ["GPTNeoXForCausalLM"])[0]

    @property
    def task(self) -> str:
        return TASKS[self.architecture]

    @property
    def context_length(self) -> int:
        return context_limit(self.config)

    @classmethod
    def open(cls, path_or_id: str | Path) -> Source:
        """Resolves the checkpoint (downloading a hub id) and reads its config; the weights load later."""
        from neoxlite.app.models import display_name

        from neoxlite.hub import resolve

        folder = resolve(path_or_id)
        config = GPTNeoXConfig.from_json_file(folder / "config.json")
        source = cls(name=display_name(path_or_id), folder=folder, config=config)
        if source.architecture not in TASKS:
            raise ValueError(
                f"{path_or_id}: config.json says architectures={source.config.architectures!r}; the app serves "
                f"{', '.join(TASKS)}. Pass a GPT-NeoX checkpoint with one of those heads."
            )
        return source


@dataclass
class Sampling:
    """The chat tab's sampling settings; defaults are the CLI's (neoxlite.options.DEFAULT_SAMPLING)."""

    temperature: float = DEFAULT_SAMPLING["temperature"]  # 0 means greedy
    top_p: float = DEFAULT_SAMPLING["top_p"]  # 1 means off
    top_k: int = DEFAULT_SAMPLING["top_k"]  # 0 means off
    max_new_tokens: int = DEFAULT_SAMPLING["max_new_tokens"]
    repetition_penalty: float = DEFAULT_SAMPLING["repetition_penalty"]
    seed: int | None = DEFAULT_SAMPLING["seed"]  # None (or negative): a fresh random seed each time

    def generate_kwargs(self) -> dict[str, Any]:
        """generate()/stream_text() keywords, validated by the same code as the CLI's flags."""
        if self.seed is not None and self.seed > MAX_SEED:
            raise ValueError(f"seed {self.seed} is too large: use 0 to {MAX_SEED}, or -1 for a random seed")
        values = vars(self) | {"seed": self.seed if self.seed is not None and self.seed >= 0 else None}
        return sampling_kwargs(values)


@dataclass(frozen=True)
class Partial:
    """A reply while it streams."""

    text: str = ""
    tokens: int = 0  # generated so far (the text re-encoded; a stop string's tokens included)
    seconds: float = 0.0
    done: bool = False

    @property
    def status(self) -> str:
        rate = f", {self.tokens / self.seconds:.1f} tokens/s" if self.seconds > 0 else ""
        return f"{'Done' if self.done else 'Generating'}: {self.tokens} tokens in {self.seconds:.1f} s{rate}"


@dataclass
class Answer:
    text: str
    score: float  # probability of this span among all spans in the context
    start: int  # character offsets of the span in the context
    end: int


class LoadError(RuntimeError):
    """A checkpoint failed to load; every request says so (the traceback went to stderr once)."""


@dataclass
class LoadStep:
    source: Source
    state: str = "waiting"  # waiting | loading | ready | failed
    seconds: float = 0.0
    error: str = ""
    started: float = field(default=0.0, repr=False)
    block: str = ""  # the block loaded last
    blocks_done: int = 0
    blocks_total: int = 0

    def on_block(self, block: str, done: int, total: int) -> None:
        """The loader's progress callback (neoxlite.loading.load_pretrained's on_block)."""
        self.block, self.blocks_done, self.blocks_total = block, done, total


class Engine:
    """Holds one model per task and runs requests on them, one at a time."""

    def __init__(self, sources: Sequence[Source], load_kwargs: dict[str, Any] | None = None):
        by_task: dict[str, Source] = {}
        for source in sources:
            if source.task in by_task:
                raise ValueError(
                    f"both {by_task[source.task].name} and {source.name} are {source.architecture} checkpoints; "
                    "the app serves one checkpoint per head: pass one of them."
                )
            by_task[source.task] = source
        if not by_task:
            raise ValueError("no checkpoint to serve: pass -m MODEL and/or --head PATH")
        self.sources = {task: by_task[task] for task in TASK_TITLES if task in by_task}
        self.load_kwargs = dict(load_kwargs or {})
        self.task_kwargs = {task: self.load_kwargs for task in self.sources}  # each model's load keywords
        self.models: dict[str, torch.nn.Module] = {}
        self.tokenizers: dict[str, Any] = {}
        self.steps = [LoadStep(source) for source in self.sources.values()]
        self._loaded = threading.Event()
        self._error: str | None = None
        self._lock = threading.Lock()  # one request on the models at a time, whoever calls
        self.max_waiting = 64  # chat requests queued beyond the batcher's rows (serve --ui: --max-waiting)

    @classmethod
    def from_paths(cls, model: str | Path | None = None, heads: Sequence[str | Path] = (),
                   **load_kwargs: Any) -> Engine:
        """Reads the checkpoints' configs (fast; weights load later). No model and no heads: the demo."""
        if model is None and not heads:
            from neoxlite.demo import demo_head_paths, demo_path  # the shipped demo and its heads

            model, heads = demo_path(), demo_head_paths()
        paths = ([model] if model is not None else []) + list(heads)
        return cls([Source.open(p) for p in paths], load_kwargs)

    @property
    def tasks(self) -> list[str]:
        return list(self.sources)

    def context_length(self, task: str) -> int:
        """Tokens a request may use: the model's context, or less when the load reserved less (max_context)."""
        reserved = self.task_kwargs.get(task, self.load_kwargs).get("max_context")
        limit = self.sources[task].context_length
        return min(limit, int(reserved)) if reserved else limit

    # --- loading ----------------------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Loads the weights in a background thread; requests wait for it."""
        thread = threading.Thread(target=self.load, name="neoxlite-app-load", daemon=True)
        thread.start()
        return thread

    def load(self) -> None:
        """Loads every checkpoint in turn (the chat model first); a failure is kept for `wait` to raise."""
        import neoxlite
        from neoxlite.api import load

        try:
            for step in self.steps:
                step.state, step.started = "loading", time.perf_counter()
                source = step.source
                model, tokenizer = load(source.folder, cls=getattr(neoxlite, source.architecture),
                                        on_block=step.on_block, **self.load_kwargs)
                self.models[source.task], self.tokenizers[source.task] = model, tokenizer
                step.state, step.seconds = "ready", time.perf_counter() - step.started
        except Exception as e:  # reported in the UI and on every request; the traceback goes to stderr
            traceback.print_exc(file=sys.stderr)
            step.state, step.seconds = "failed", time.perf_counter() - step.started
            step.error = self._error = f"{type(e).__name__}: {e}"
        finally:
            self._loaded.set()

    @property
    def loading(self) -> bool:
        """True until every checkpoint has loaded (or one failed)."""
        return not self._loaded.is_set()

    def wait(self) -> None:
        """Blocks until the weights are loaded; raises LoadError if loading failed."""
        self._loaded.wait()
        if self._error is not None:
            raise LoadError(f"the model failed to load ({self._error}); fix the flags and restart the app")

    def _get(self, task: str) -> tuple[torch.nn.Module, Any]:
        if task not in self.sources:
            flag = "-m MODEL" if task == "chat" else "--head PATH"
            raise ValueError(f"no {TASK_TITLES[task].lower()} model is loaded; start the app with {flag} "
                             f"pointing at a {next(a for a, t in TASKS.items() if t == task)} checkpoint, "
                             "or load one in the Models tab")
        self.wait()
        if task not in self.models:  # an earlier checkpoint failed, so the loader never reached this one
            raise LoadError(f"the {TASK_TITLES[task].lower()} model was not loaded; load it in the Models tab")
        return self.models[task], self.tokenizers[task]

    # --- loading from the page: one model per task, the old one freed first ---------------------------

    def load_checkpoint(self, location: str | Path, load_kwargs: dict[str, Any],
                        on_block: Callable[[str, int, int], None] | None = None) -> LoadStep:
        """Loads `location` in place of the model serving the same task, in the caller's thread.

        The model it replaces is unloaded (and its memory given back) before the new weights are read, so
        the two never need room at once. on_block(block, done, total) follows the loader; the step (also in
        `load_status`) says how it went. A failure leaves the task with no model and raises.
        """
        import neoxlite
        from neoxlite.api import load

        source = Source.open(location)
        step = LoadStep(source)

        def progress(block: str, done: int, total: int) -> None:
            step.on_block(block, done, total)
            if on_block is not None:
                on_block(block, done, total)

        self._loaded.wait()  # the launch's own loading finishes first
        self.unload(source.task)
        step.state, step.started = "loading", time.perf_counter()
        self.steps.append(step)
        try:
            model, tokenizer = load(source.folder, cls=getattr(neoxlite, source.architecture),
                                    on_block=progress, **load_kwargs)
        except Exception as e:
            step.state, step.seconds = "failed", time.perf_counter() - step.started
            step.error = f"{type(e).__name__}: {e}"
            release_memory()  # whatever the loader had built before it failed
            raise
        with self._lock:
            self.models[source.task], self.tokenizers[source.task] = model, tokenizer
            self.task_kwargs[source.task] = dict(load_kwargs)
            self.sources[source.task] = source
            self.sources = {task: self.sources[task] for task in TASK_TITLES if task in self.sources}  # tab order
        step.state, step.seconds = "ready", time.perf_counter() - step.started
        return step

    def unload(self, task: str) -> bool:
        """Drops the model serving `task` and gives its memory back; False when none was loaded."""
        with self._lock:
            had = task in self.sources
            self.models.pop(task, None)
            self.tokenizers.pop(task, None)
            self.sources.pop(task, None)
            self.task_kwargs.pop(task, None)
            self.steps = [s for s in self.steps if s.source.task != task]
            if not any(s.state == "failed" for s in self.steps):
                self._error = None  # the failed launch checkpoint is gone with it
            batcher = self.__dict__.pop("_batcher", None) if task == "chat" else None
        if batcher is not None:
            batcher.close()  # it holds the model and its KV cache: both go with it
        release_memory()
        return had

    # --- chat -------------------------------------------------------------------------------------------

    def chat_prompt(self, system: str, history: list[prompting.Message], message: str,
                    sampling: Sampling, style: str = "chat") -> prompting.Prompt:
        check_text(message, "message")
        for i, m in enumerate(history):
            check_text(m["content"], f"message {i + 1} of the chat", required=False)
        _, tokenizer = self._get("chat")
        limit = self.context_length("chat")
        for text, what in ((system, "system prompt"), (message, "message")):  # refused before tokenizing
            check_text(text, what, required=False)
            check_text_fits(text, tokenizer, limit, what)
        return prompting.build_prompt(tokenizer, system, history, message,
                                      max_new_tokens=int(sampling.max_new_tokens), context_length=limit,
                                      style=style, max_text_bytes=max_text_bytes(tokenizer, limit))

    def stream_reply(self, prompt: prompting.Prompt, sampling: Sampling) -> Iterator[Partial]:
        """Yields the reply so far after each new piece of text, stop strings cut; the last one is final. Replies
        run on the chat model's batcher: people chatting at once are decoded together, not queued."""
        from neoxlite.batching import Finish, Request, eos_token_ids
        from neoxlite.generation import SamplingSettings

        batcher = self.chat_batcher()
        tokenizer = batcher.tokenizer
        kw = sampling.generate_kwargs()
        settings = SamplingSettings(kw["do_sample"], kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"),
                                    kw["repetition_penalty"])
        request = batcher.submit(Request(tokenizer.encode(prompt.text), prompt.max_new_tokens, settings,
                                         kw.get("seed"), eos_token_ids(batcher.model, tokenizer),
                                         prompt.stop_strings))
        reply, ids, started = Partial(), [], time.perf_counter()
        try:
            for event in request.events():
                if isinstance(event, Finish):
                    if event.reason == "error":
                        raise RuntimeError(f"generation failed: {event.error}")
                    break
                ids.append(event.id)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # part of a character: wait for the rest
                visible, stopped = prompting.cut_at_stop(text, prompt.stop_strings)
                if prompt.style == "chat":
                    visible = visible.strip()
                reply = Partial(visible, len(tokenizer.encode(text)), time.perf_counter() - started)
                if stopped:
                    break
                yield reply
        finally:
            request.cancel()  # a reply abandoned by its reader (Stop, a closed tab) frees its row
        yield Partial(reply.text, reply.tokens, reply.seconds, done=True)

    def chat_tokens(self, system: str, history: list[prompting.Message],
                    style: str = "chat") -> tuple[list[int | None], int | None]:
        """(tokens of each message, tokens the conversation takes as the next prompt) for the context meter.

        Only the newest messages whose text could still fit in the context are tokenized: an older message's
        count is None, and so is the total when any is left out (the conversation is longer than the context).
        """
        _, tokenizer = self._get("chat")
        sizes = [prompting.utf8_size(m["content"]) for m in history]
        room = max_text_bytes(tokenizer, self.context_length("chat")) - prompting.utf8_size(system)
        first = len(history)
        while first > 0 and sizes[first - 1] <= room:
            first -= 1
            room -= sizes[first]
        if room < 0 or first > 0:
            return [None] * first + [self._count(tokenizer, m["content"]) for m in history[first:]], None
        counts: list[int | None] = [self._count(tokenizer, m["content"]) for m in history]
        rendered = prompting.render(tokenizer, system, history, style) if history else ""
        return counts, self._count(tokenizer, rendered) if history else 0

    @staticmethod
    def _count(tokenizer: Any, text: str) -> int:
        return len(tokenizer.encode(text.encode("utf-8", "replace").decode("utf-8")))  # a lone surrogate: "?"

    def chat_batcher(self) -> Any:
        """The Batcher that runs every chat reply (the page's and, with `neoxlite serve --ui`, the API's), made for
        the loaded chat model at first use: rows for --max-batch-size requests (default: what the memory plan
        reserved, else 4), then up to self.max_waiting queued."""
        from neoxlite.batching import Batcher

        model, tokenizer = self._get("chat")
        with self._lock:
            batcher = self.__dict__.get("_batcher")
            if batcher is None or batcher.model is not model:
                if batcher is not None:
                    batcher.close()
                reserved = getattr(model, "offload_workload", None)
                rows = self.load_kwargs.get("max_batch_size") or (reserved[0] if reserved else 4)
                batcher = self._batcher = Batcher(model, tokenizer, max_batch_size=rows,
                                                  max_context=self.context_length("chat"), max_waiting=self.max_waiting)
        return batcher

    # --- heads ------------------------------------------------------------------------------------------

    def _encode(self, task: str, text: str, what: str, special: bool = True) -> tuple[torch.nn.Module, Any, list[int]]:
        check_text(text, what)
        model, tokenizer = self._get(task)
        check_text_fits(text, tokenizer, self.context_length(task), what)  # refused before tokenizing
        ids = tokenizer.encode(text, add_special_tokens=special)
        limit = self.context_length(task)
        if len(ids) > limit:
            raise ValueError(f"The {what} is {len(ids)} tokens; this model reads at most {limit}. Shorten it.")
        return model, tokenizer, ids

    def _forward(self, model: torch.nn.Module, ids: list[int]) -> Any:
        input_ids = torch.tensor([ids], device=model.device)
        with self._lock, torch.inference_mode():
            return model(input_ids, attention_mask=torch.ones_like(input_ids))

    def classify(self, text: str) -> dict[str, float]:
        """Probability of each label (config id2label) for the whole text."""
        model, _, ids = self._encode("classify", text, "text")
        probs = self._forward(model, ids).logits[0].float().softmax(-1).tolist()
        labels = _labels(model)
        return {labels(i): p for i, p in enumerate(probs)}

    def tag(self, text: str) -> list[tuple[str, str]]:
        """(piece of text, label) per token, pieces joining back into the text."""
        model, tokenizer, ids = self._encode("tag", text, "text")
        best = self._forward(model, ids).logits[0].argmax(-1).tolist()
        labels = _labels(model)
        return [(piece, labels(best[i])) for piece, i in _pieces(tokenizer, ids)]

    def answer(self, question: str, context: str) -> Answer:
        """The best span of `context` answering `question`.

        Input layout (shared with the demo QA head's training): the tokens of question + "\\n", then the
        tokens of the context, each encoded alone without special tokens. The span is searched in the
        context tokens only.
        """
        check_text(question, "question")
        model, tokenizer, ctx_ids = self._encode("answer", context, "context", special=False)
        check_text_fits(question, tokenizer, self.context_length("answer"), "question")
        q_ids = tokenizer.encode(question.strip() + "\n", add_special_tokens=False)
        limit = self.context_length("answer")
        if len(q_ids) + len(ctx_ids) > limit:
            raise ValueError(f"Question and context are {len(q_ids) + len(ctx_ids)} tokens; this model reads at "
                             f"most {limit}. Shorten the context.")
        out = self._forward(model, q_ids + ctx_ids)
        n_q = len(q_ids)
        start = out.start_logits[0, n_q:].float().log_softmax(-1)  # (C,)
        end = out.end_logits[0, n_q:].float().log_softmax(-1)  # (C,)
        pair = start[:, None] + end[None, :]  # (C, C): log p(start=i) + log p(end=j)
        n = pair.shape[0]
        allowed = torch.ones(n, n, dtype=torch.bool).triu().logical_and(
            torch.ones(n, n, dtype=torch.bool).tril(MAX_ANSWER_TOKENS - 1))
        pair = pair.masked_fill(~allowed, float("-inf"))
        flat = int(pair.argmax())
        i, j = divmod(flat, n)
        span = tokenizer.decode(ctx_ids[i:j + 1])
        start_char = len(tokenizer.decode(ctx_ids[:i])) + len(span) - len(span.lstrip())
        return Answer(text=span.strip(), score=float(pair[i, j].exp()), start=start_char,
                      end=start_char + len(span.strip()))

    # --- memory -----------------------------------------------------------------------------------------

    def load_status(self) -> list[tuple[str, str, str, float, str]]:
        """(task, checkpoint, state, seconds, error) per checkpoint, in load order."""
        now = time.perf_counter()
        return [(s.source.task, s.source.name, s.state,
                 now - s.started if s.state == "loading" else s.seconds, s.error) for s in self.steps]

    def placement(self) -> list[tuple[str, str, str, int]]:
        """(task, block, home, bytes) for every block of every loaded model."""
        return [(task, block, home, size) for task, model in list(self.models.items())
                for block, home, size in block_placement(model)]


def _labels(model: torch.nn.Module):
    id2label = model.config.id2label or {}
    return lambda i: id2label.get(i, f"LABEL_{i}")


def _pieces(tokenizer: Any, ids: list[int]) -> list[tuple[str, int]]:
    """Splits the decoded text into one piece per token, as (piece, token index).

    A character split across tokens (byte-level BPE) goes to the piece of the token that completes it.
    """
    pieces, shown = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids):
            continue
        pieces.append((text[len(shown):], i))
        shown = text
    return pieces


# --- where blocks live -----------------------------------------------------------------------------------

_TIERS = {"gpu": "GPU", "cpu": "RAM", "disk": "disk"}


def block_placement(model: torch.nn.Module) -> list[tuple[str, str, int]]:
    """(block, home, bytes) per block ("embed_in", "layers.i", "head"), in model order.

    An offloaded model carries its plan (`model.offload_plan`, from neoxlite.offload): each block's tier and
    size in final form. Otherwise every block sits on the compute device, at its current size.
    """
    plan = getattr(model, "offload_plan", None)
    if plan is not None:
        return [(block, _TIERS[home], plan.block_bytes[block]) for block, home in plan.homes.items()]
    home = "GPU" if model.device.type == "cuda" else "RAM"
    return [(block, home, size) for block, size in model.block_sizes().items()]


@dataclass
class TierUse:
    """One bar of the memory chart: what the loaded models hold on a tier, against its budget."""

    tier: str  # "GPU", "pinned RAM", "RAM" (pinned included) or "disk"
    used: int  # bytes of weights and reservations (KV cache, workspace, transfer slots) the plans put there
    budget: int | None  # the load's budget for the tier (summed over models); None: none was set
    free: int | None  # free memory (or disk space) there now; None: unknown


def tier_usage(models: Sequence[torch.nn.Module]) -> list[TierUse]:
    """Bytes per tier over `models`: from each model's offload plan when it has one, else its block sizes.

    On a CUDA machine the layers an offload plan keeps in RAM, and the staging buffers for disk reads, are
    pinned (page-locked); the embedding and head kept in RAM are not.
    """
    used = {"GPU": 0, "pinned RAM": 0, "RAM": 0, "disk": 0}
    budgets: dict[str, int] = {}
    disk_dirs: set[str] = set()
    for model in models:
        plan = getattr(model, "offload_plan", None)
        if plan is None:
            for _, home, size in block_placement(model):
                used[home] += size
            continue
        pinned = plan.compute == "gpu"
        for block, home in plan.homes.items():
            tier = _TIERS[home]
            if tier == "RAM" and pinned and block.startswith("layers."):
                tier = "pinned RAM"
            used[tier] += plan.block_bytes[block]
        for home, reserved in plan.reserved.items():
            for what, size in reserved.items():
                tier = "pinned RAM" if what == "staging" and pinned else _TIERS[home]
                used[tier] += size
        for home, budget in plan.budgets.items():
            if budget:
                budgets[_TIERS[home]] = budgets.get(_TIERS[home], 0) + budget
        if plan.offload_dir is not None:
            disk_dirs.add(plan.offload_dir)
    free_ram = psutil.virtual_memory().available
    free = {"GPU": torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None,
            "pinned RAM": free_ram, "RAM": free_ram,
            "disk": sum(shutil.disk_usage(d).free for d in disk_dirs if Path(d).is_dir()) if disk_dirs else None}
    shown = ["GPU", "pinned RAM"] if torch.cuda.is_available() else []
    shown += ["RAM"] + (["disk"] if disk_dirs or used["disk"] else [])
    used["RAM"] += used["pinned RAM"]  # the RAM budget covers both: the RAM bar counts all, pinned shows its part
    return [TierUse(t, used[t], budgets.get(t), free[t]) for t in shown]


def release_memory() -> None:
    """Returns freed weights to the OS now: collects cycles, empties the CUDA cache, trims glibc's heap."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): the allocator keeps its own policy
            pass


def memory_now() -> dict[str, int | None]:
    """RAM and VRAM in use now and at peak, in bytes (None where there is no such thing)."""
    process = psutil.Process()
    info = process.memory_info()
    peak = getattr(info, "peak_wset", None)  # Windows
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    stats: dict[str, int | None] = {
        "ram": info.rss, "ram_peak": max(peak, info.rss), "ram_total": psutil.virtual_memory().total,
        "vram": None, "vram_peak": None, "vram_reserved": None, "vram_total": None,
    }
    if torch.cuda.is_available():
        stats.update(vram=torch.cuda.memory_allocated(), vram_peak=torch.cuda.max_memory_allocated(),
                     vram_reserved=torch.cuda.memory_reserved(),
                     vram_total=torch.cuda.get_device_properties(0).total_memory)
    return stats
