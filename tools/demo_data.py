"""Corpus, split and label builders for neoxlite's built-in demo model (issue 6).

The corpus is the Python standard library's own source tree: every ``.py`` file under
``sysconfig.get_paths()["stdlib"]``, minus

- ``site-packages/`` (third-party code, not part of Python),
- test suites (any path component ``test``, ``tests`` or ``idle_test``; they are larger than the library
  itself, and mostly assertion boilerplate; a 30-minute CPU budget is better spent on library code),
- machine-generated files: ``pydoc_data/`` (the HTML docs as one string), ``_sysconfigdata_*.py``
  (build paths of this machine) and the ``encodings/`` codecs written by ``gencodec.py`` (256-entry tables).

Split: a file is held out when ``sha256(relative path) mod 100 < 5`` (about 5% of files), so the split
depends on file names only, is the same on every machine and every run, and needs no seed. The list
actually used is written to ``tools/demo_split.json`` together with the Python version it came from.

The heads' labels are derived from the same files with no hand labelling:

- token classification: the type of the Python token (``tokenize`` module) that covers the first
  character of each BPE token that is not a space or tab (hard keywords split out of NAME; spaces and
  indentation as WHITESPACE; NEWLINE and NL as NEWLINE);
- sequence classification: the kind of statement a chunk of 1-4 source lines starts with, read off its
  first token (function / class / import / control_flow / statement);
- extractive QA: "What does NAME return?" over NAME's source, alone or among one or two other functions
  of the same file; the answer is the expression of its single ``return`` (1-60 characters, the rest
  of its line).

Run ``python tools/demo_data.py`` to (re)write ``tools/demo_split.json`` and print corpus statistics.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import keyword
import random
import sys
import sysconfig
import textwrap
import token
import tokenize
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_PERCENT = 5
SPLIT_FILE = Path(__file__).resolve().parent / "demo_split.json"
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _excluded(rel: Path, text_head: str) -> str | None:
    """Why a file is left out of the corpus, or None when it is kept."""
    parts = rel.parts
    if "site-packages" in parts or "dist-packages" in parts:
        return "site-packages"
    if any(p in _TEST_DIRS for p in parts[:-1]):
        return "test suite"
    if parts[0] == "pydoc_data" or rel.name.startswith("_sysconfigdata"):
        return "generated"
    if parts[0].startswith("config-"):
        return "build config"
    if parts[0] == "encodings" and "gencodec.py" in text_head:
        return "generated"
    return None


def is_held_out(rel: str) -> bool:
    digest = hashlib.sha256(rel.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < HELD_OUT_PERCENT


@dataclass(frozen=True)
class SourceFile:
    rel: str  # posix path relative to the stdlib root, e.g. "json/decoder.py"
    text: str


def corpus(root: Path | None = None) -> list[SourceFile]:
    """All kept stdlib files, sorted by relative path (deterministic order)."""
    root = root or stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a handful of latin-1 encoded files in old Pythons
            continue
        if _excluded(rel, text[:400]) is None and text.strip():
            out.append(SourceFile(rel.as_posix(), text))
    return out


def split(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    train = [f for f in files if not is_held_out(f.rel)]
    held = [f for f in files if is_held_out(f.rel)]
    return train, held


def split_info(files: list[SourceFile]) -> dict:
    """The split as written to demo_split.json: rule, sizes and the held-out file list."""
    train, held = split(files)
    info = {
        "python": sys.version.split()[0],
        "rule": f"held out iff int(sha256(relative_path).hexdigest()[:8], 16) % 100 < {HELD_OUT_PERCENT}",
        "train_files": len(train),
        "train_bytes": sum(len(f.text.encode()) for f in train),
        "held_out_files": len(held),
        "held_out_bytes": sum(len(f.text.encode()) for f in held),
        "held_out": [f.rel for f in held],
    }
    return info


def write_split(files: list[SourceFile], path: Path = SPLIT_FILE) -> dict:
    info = split_info(files)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(path)
    return info


# ----------------------------------------------------------------------------- token classification

TOKEN_LABELS = ["WHITESPACE", "NAME", "KEYWORD", "OP", "NUMBER", "STRING", "COMMENT", "NEWLINE"]


def char_token_types(text: str) -> list[int] | None:
    """Per character of ``text``: an index into TOKEN_LABELS, from Python's ``tokenize``.

    KEYWORD means the hard keywords of ``keyword.kwlist`` (soft ones like ``match`` are usually plain names).
    Characters no token covers (spaces between tokens, indentation, line continuations) are WHITESPACE.
    NEWLINE and NL are NEWLINE; f-string pieces (3.12+) count as STRING. None if ``text`` does not tokenize.
    """
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    labels = [0] * len(text)
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    for tok in toks:
        kind = tok.type
        if kind == token.NAME:
            lab = 2 if keyword.iskeyword(tok.string) else 1  # soft keywords (match, case, _) are mostly names
        elif kind == token.OP:
            lab = 3
        elif kind == token.NUMBER:
            lab = 4
        elif kind == token.STRING or token.tok_name[kind].startswith("FSTRING"):
            lab = 5
        elif kind == token.COMMENT:
            lab = 6
        elif kind in (token.NEWLINE, token.NL):
            lab = 7
        else:  # INDENT/DEDENT/ENDMARKER/ENCODING: whitespace or nothing
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        if r0 - 1 >= len(line_starts) or r1 - 1 >= len(line_starts):
            continue
        a, b = line_starts[r0 - 1] + c0, line_starts[r1 - 1] + c1
        for i in range(a, min(b, len(text))):
            labels[i] = lab
    return labels


# ----------------------------------------------------------------------------- sequence classification

SEQ_LABELS = ["function", "class", "import", "control_flow", "statement"]
_CONTROL = {"if", "elif", "else", "for", "while", "try", "except", "finally", "with", "match", "case"}


def _statement_starts(text: str) -> list[tuple[int, str]]:
    """(0-based line, first token) of every logical line, from ``tokenize`` (continuation lines excluded)."""
    out = []
    at_start = True
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (token.NEWLINE, token.ENDMARKER):
                at_start = True
            elif tok.type in (token.INDENT, token.DEDENT, token.NL, token.COMMENT, token.ENCODING):
                continue
            elif at_start:
                out.append((tok.start[0] - 1, tok.string if tok.type != token.STRING else '"'))
                at_start = False
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []
    return out


def top_level_starts(text: str) -> list[int]:
    """Character offsets where a logical line starts at column 0: where a pasted snippet would begin."""
    offsets = [0]
    for line in text.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return [offsets[n] for n, _ in _statement_starts(text) if n < len(offsets) - 1 and text[offsets[n]] not in " \t"]


def _statement_label(first: str, second: str) -> int | None:
    if first == "async":
        first = second
    if first == "def":
        return 0
    if first == "class":
        return 1
    if first in ("import", "from"):
        return 2
    if first in _CONTROL:
        return 3
    if first in ("@", '"'):  # decorators and docstrings: no statement kind to read
        return None
    return 4


def seq_examples(files: list[SourceFile], per_label: int, seed: int) -> list[tuple[str, int]]:
    """(chunk, label index into SEQ_LABELS): 1-4 lines starting at a logical line, dedented.

    The label is the kind of statement the chunk starts with (its first token: def / class / import,
    from / if, for, while, try, with, ... / anything else), so it is read off the text, never hand-made.
    Up to ``per_label`` distinct chunks per label and file.
    """
    out = []
    for f in files:
        rng = random.Random(f"{seed}:{f.rel}")
        lines = f.text.splitlines(keepends=True)
        by_label: dict[int, list[int]] = {i: [] for i in range(len(SEQ_LABELS))}
        for line_no, _ in _statement_starts(f.text):
            words = lines[line_no].split(None, 2) + ["", ""]
            first = words[0].split("(")[0].split(":")[0].split(".")[0] if words[0][:1].isalpha() else words[0][:1]
            lab = _statement_label(first, words[1])
            if lab is not None:
                by_label[lab].append(line_no)
        for lab, starts in by_label.items():
            for line_no in rng.sample(starts, min(per_label, len(starts))):
                n = rng.randint(1, 4)
                chunk = textwrap.dedent("".join(lines[line_no : line_no + n])).strip("\n")
                if chunk:
                    out.append((chunk, lab))
    random.Random(seed).shuffle(out)
    return out


# ----------------------------------------------------------------------------- extractive QA


@dataclass(frozen=True)
class QAExample:
    question: str
    context: str
    answer_start: int  # character offset of the answer in context
    answer: str  # the return expression; in the context it is always followed by a newline or the end


@dataclass(frozen=True)
class _Function:
    name: str
    source: str  # dedented, ends with a newline
    answer_start: int
    answer: str


def _functions(f: SourceFile, max_chars: int) -> list[_Function]:
    """Functions with exactly one ``return <expr>`` of their own, alone on the last part of its line."""
    try:
        tree = ast.parse(f.text)
    except SyntaxError:
        return []
    lines = f.text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        rets = _own_returns(node)
        if len(rets) != 1 or rets[0].value is None or rets[0].lineno != rets[0].end_lineno:
            continue
        ret = rets[0]
        first = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        body = lines[first : node.end_lineno]
        indent = len(body[0]) - len(body[0].lstrip())
        ctx_lines = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in body]
        source = "".join(ctx_lines)
        if len(source) > max_chars or not source.endswith("\n"):
            continue
        line_b = lines[ret.lineno - 1].encode("utf-8")  # ast columns are utf-8 byte offsets
        if line_b[ret.value.end_col_offset :].strip():  # a trailing comment or `; more`
            continue
        answer = line_b[ret.value.col_offset : ret.value.end_col_offset].decode("utf-8")
        col = len(line_b[: ret.value.col_offset].decode("utf-8")) - indent
        start = sum(len(x) for x in ctx_lines[: ret.lineno - 1 - first]) + col
        if not 1 <= len(answer) <= 60 or source[start : start + len(answer)] != answer:
            continue
        out.append(_Function(node.name, source, start, answer))
    return out


def qa_examples(files: list[SourceFile], seed: int, max_chars: int = 800) -> list[QAExample]:
    """'What does NAME return?' -> the expression of NAME's single return statement.

    The context is NAME's source alone or with one or two other such functions of the same file
    (random order), so the head must match the name in the question to the right ``def``. In 30% of
    examples the context's final newline is dropped, as a pasted snippet often lacks one.
    """
    out = []
    for f in files:
        rng = random.Random(f"{seed}:{f.rel}")
        funcs = _functions(f, max_chars)
        for target in funcs:
            others = [g for g in funcs if g.name != target.name]
            chosen = [target] + rng.sample(others, min(len(others), rng.choice([0, 1, 2])))
            while sum(len(g.source) + 1 for g in chosen) > max_chars:
                chosen.pop()
            rng.shuffle(chosen)
            context, start = "", -1
            for g in chosen:
                if context:
                    context += "\n"
                if g is target:
                    start = len(context) + g.answer_start
                context += g.source
            if rng.random() < 0.3:
                context = context[:-1]
            assert context[start : start + len(target.answer)] == target.answer
            out.append(QAExample(f"What does {target.name} return?", context, start, target.answer))
    return out


def _own_returns(func: ast.AST) -> list[ast.Return]:
    """The return statements of ``func`` itself (not of nested functions, lambdas or classes)."""
    out: list[ast.Return] = []
    stack = list(ast.iter_child_nodes(func))
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Return):
            out.append(n)
        if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            stack.extend(ast.iter_child_nodes(n))
    return out


def main() -> None:
    files = corpus()
    info = write_split(files)
    print(f"stdlib: {stdlib_root()} (Python {info['python']})")
    print(f"train: {info['train_files']} files, {info['train_bytes'] / 1e6:.2f} MB")
    print(f"held out: {info['held_out_files']} files, {info['held_out_bytes'] / 1e6:.2f} MB -> {SPLIT_FILE}")


if __name__ == "__main__":
    main()
