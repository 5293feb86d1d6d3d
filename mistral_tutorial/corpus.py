"""A small mixed-domain corpus, built offline, to train a tiny Mixtral and ask Mixtral §5's question: do experts specialise?

Three domains, each a list of documents, like three of the Pile subsets the paper routes (Fig 7, Table 5):

* ``python``: source files of the standard library (a fixed list of pure-Python modules), cut into chunks at blank lines;
  the analogue of the Pile's Github.
* ``prose``: English paragraphs: the reference texts `pydoc` ships (`pydoc_data.topics`), then the docstrings of other
  stdlib modules, with indented grammar and code blocks left out and wrapped lines joined; the analogue of Wikipedia.
* ``math``: question / answer pairs in the style of DeepMind Mathematics (Saxton et al. 2019), made by a seeded
  generator; the analogue of the Pile's DM Mathematics, synthetic there too.

Everything is deterministic: the same arguments give the same documents on the same Python version (the stdlib files
and pydoc texts differ a little between Python versions; the math generator does not). Nothing is downloaded.
"""

from __future__ import annotations

import math
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DOMAINS = ("python", "prose", "math")

# Pure-Python stdlib modules present from 3.10 to 3.13, in a fixed order (importing none of them).
PYTHON_MODULES = ("argparse", "ast", "bisect", "calendar", "configparser", "contextlib", "copy", "csv", "dataclasses",
                  "difflib", "enum", "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob", "gzip",
                  "heapq", "hmac", "inspect", "ipaddress", "locale", "logging/__init__", "mimetypes", "netrc",
                  "numbers", "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "quopri", "random",
                  "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "statistics", "string", "tarfile",
                  "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
                  "uuid", "warnings", "weakref", "zipfile")


def python_documents(max_chars: int, doc_chars: int = 1500) -> list[str]:
    """Chunks of about `doc_chars` characters of stdlib source, cut at blank lines, `max_chars` in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents: list[str] = []
    total = 0
    for name in PYTHON_MODULES:
        path = stdlib / f"{name}.py"
        if not path.is_file():
            continue
        chunk: list[str] = []
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            chunk.append(block.rstrip())
            if sum(len(b) for b in chunk) >= doc_chars:
                documents.append("\n\n".join(chunk) + "\n")
                total += len(documents[-1])
                chunk = []
                if total >= max_chars:
                    return documents
    return documents


def _paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a text: blocks of unindented lines (code, grammar and lists left out), unwrapped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith((" ", "\t", ">>>", "*", "-", "|")) for line in lines):
            continue
        if len(lines) >= 2 and set(lines[-1]) <= set("*=-~"):                # a title and its underline
            continue
        paragraph = " ".join(line.strip() for line in lines).strip()
        if len(paragraph) > 80:
            paragraphs.append(paragraph)
    return paragraphs


def _prose_sources() -> Iterator[str]:
    """`pydoc_data.topics` (one text a topic), then the docstrings of each stdlib module not in PYTHON_MODULES (one
    text a module), read with `ast`: nothing is imported."""
    import ast
    from pydoc_data.topics import topics

    yield from (topics[name] for name in sorted(topics))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        if path.stem in PYTHON_MODULES or path.stem.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        yield "\n\n".join(d for d in map(ast.get_docstring, nodes) if d)   # get_docstring() removes the indentation


def prose_documents(max_chars: int) -> list[str]:
    """English paragraphs from pydoc's topics and stdlib docstrings, one document a source, `max_chars` in all."""
    documents: list[str] = []
    total = 0
    for text in _prose_sources():
        paragraphs = _paragraphs(text)
        if paragraphs:
            documents.append("\n\n".join(paragraphs) + "\n")
            total += len(documents[-1])
            if total >= max_chars:
                break
    return documents


# ---------------------------------------------------------------------------------------------------------------------
def _number(rng: random.Random, decimals: bool = True) -> str:
    """An integer of 1-4 digits, sometimes negative, sometimes with one decimal place (DM Mathematics style)."""
    value = rng.randint(-999, 9999) if rng.random() < 0.8 else rng.randint(-99, 99)
    if decimals and rng.random() < 0.3:
        return f"{value / 10:g}"
    return str(value)


def _math_problem(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair from one of eight templates."""
    kind = rng.randrange(8)
    if kind == 0:
        a, b = _number(rng), _number(rng)
        op = rng.choice(["+", "-"])
        value = float(a) + float(b) if op == "+" else float(a) - float(b)
        return f"Calculate {a} {op} {b}.", f"{round(value, 1):g}"
    if kind == 1:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} times {b}?", str(a * b)
    if kind == 2:
        x, a, b = rng.randint(-20, 20), rng.randint(2, 12), rng.randint(-50, 50)
        var = rng.choice("xyzkmnqt")
        return f"Solve {a}*{var} + {b} = {a * x + b} for {var}.", str(x)
    if kind == 3:
        a, b = rng.randint(20, 9999), rng.randint(2, 40)
        return f"What is the remainder when {a} is divided by {b}?", str(a % b)
    if kind == 4:
        a, b, x = rng.choice([-1, 1]) * rng.randint(2, 9), rng.randint(-20, 20), rng.randint(-9, 9)
        return f"Let f(x) = {a}*x {'-' if b < 0 else '+'} {abs(b)}. What is f({x})?", str(a * x + b)
    if kind == 5:
        a, b = rng.randint(2, 400), rng.randint(2, 400)
        return f"What is the greatest common divisor of {a} and {b}?", str(math.gcd(a, b))
    if kind == 6:
        values = [rng.randint(-50, 50) for _ in range(rng.randint(3, 5))]
        order = rng.choice(["increasing", "decreasing"])
        ordered = sorted(values, reverse=order == "decreasing")
        return f"Sort {', '.join(map(str, values))} in {order} order.", ", ".join(map(str, ordered))
    n = rng.randint(2, 500)
    is_prime = n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))
    return f"Is {n} a prime number?", "True" if is_prime else "False"


def math_documents(max_chars: int, seed: int = 0, problems_per_doc: tuple[int, int] = (8, 16)) -> list[str]:
    """Documents of 8-16 'Question: ... / Answer: ...' pairs from a seeded generator, `max_chars` in all."""
    rng = random.Random(seed)
    documents: list[str] = []
    total = 0
    while total < max_chars:
        pairs = [_math_problem(rng) for _ in range(rng.randint(*problems_per_doc))]
        documents.append("".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in pairs))
        total += len(documents[-1])
    return documents


# ---------------------------------------------------------------------------------------------------------------------
def build_corpus(chars_per_domain: int = 300_000, seed: int = 0) -> dict[str, list[str]]:
    """{domain: documents} for the three DOMAINS, about `chars_per_domain` characters each.

    Sizes on Python 3.11 with the Mistral tokenizer, for 300,000 characters: python ~83k tokens, prose ~72k, math ~143k
    (digits are one token each).
    """
    return {"python": python_documents(chars_per_domain),
            "prose": prose_documents(chars_per_domain),
            "math": math_documents(chars_per_domain, seed=seed)}


def split_corpus(corpus: dict[str, list[str]], held_out_fraction: float = 0.1, seed: int = 0
                 ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, held_out): in each domain, a seeded shuffle of the documents, the last `held_out_fraction` held out.

    Whole documents go to one side, so no held-out text was seen in training (the python chunks of one module may
    fall on both sides).
    """
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
    train, held_out = {}, {}
    for domain, documents in corpus.items():
        order = list(range(len(documents)))
        random.Random(f"{seed}-{domain}").shuffle(order)
        n_held_out = max(1, round(held_out_fraction * len(documents)))
        train[domain] = [documents[i] for i in order[:-n_held_out]]
        held_out[domain] = [documents[i] for i in order[-n_held_out:]]
    return train, held_out
