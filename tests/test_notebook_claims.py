"""What a notebook's prose says is what its cells printed.

1. Every number in a markdown cell must be supported: printed by some output of the same notebook, or a field of a
   preset, or a paper constant the package carries (`routing.MIXTRAL_TABLE_5`), or listed in `ALLOWED` below with its
   source. "Supported" means the printed value rounds to the number as written (93.4 supports "93", not "94"); a unit
   after the number (K, M, B, GB, MiB, %, ...) lets the printed value be scaled to it (131,072 supports "131 K").
   Left out, because they are names rather than claims: code (fenced and inline), LaTeX, links, citations (§2, Fig 1,
   Table 5, eq. (6), notebook 04, author-year), versions, and model names (Mistral 7B, Llama 2 13B, SmolLM2-135M).
2. No code cell leaves a bare object repr (`<torch._C.Generator at 0x...>`) as its output: end the cell with `;` or
   assign the value.

A number that depends on a setting (W, a batch size, a timing) therefore has to be printed by a cell, not typed.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

import mistral_tutorial as mt
from mistral_tutorial import routing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

NOTEBOOKS = tasks.notebook_paths()
SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")

# --- what is not a claim ------------------------------------------------------------------------------------------
SKIP = [re.compile(p) for p in (
    r"```.*?```", r"`[^`\n]*`", r"\$\$.*?\$\$", r"\$[^$\n]*\$",                   # code, LaTeX
    r"\]\([^)\s]*\)", r"https?://\S+", r"arXiv:\s*\d+\.\d+",                      # links
    r"(?:§|[Ss]ections?\s)\s*\d+(?:\.\d+)*",                                     # §2.1
    r"\b(?:Figs?|Figures?|Tables?|eqs?|Eqs?|equations?|[Aa]ppendix|notebooks?|cells?|[Ll]ines?)"
    r"\.?\s*\(?\d+[a-z]?\)?(?:\s*(?:[–,-]|and|or|to)\s*\(?\d+[a-z]?\)?)*",        # Fig 1, eqs. (3)-(5), notebook 04
    r"(?:et al\.?|[A-Z][a-z]+)\s*,?\s*\(?(?:19|20)\d\d[a-z]?\)?",                 # Shazeer 2017, Jiang et al. (2023)
    r"\b[vV]\d+(?:\.\d+)+\b|(?:transformers|torch|Python|PyTorch|nbval|CPython)\s*[≥>=]*\s*\d+(?:\.\d+)*",   # versions
    r"\b(?:Mistral|Mixtral|Llama|LLaMA|Code-Llama|GPT|SmolLM2?|MoE)(?:[- ]\d+)*(?:[- ]?\d+(?:\.\d+)?x?\d*[BMK])+",
    r"\b\d+x\d+B\b", r"#\d+",                                                    # 8x7B; issue numbers
    r"^\s*\d+\.(?=\s)", r"^\|\s*\d\d[a-z]?(?=\s)", r"^#+\s*\d\d[a-z]?\b",         # list markers, "| 04" rows, titles
    r"(?<![\d.,])0\d[a-z]?(?![\d.,])",                                            # zero-padded: notebook numbers (07)
)]
SKIP = [re.compile(p.pattern, re.DOTALL | re.MULTILINE) for p in SKIP]
NUMBER = re.compile(r"(?<![\w.\-/])([-−]?\d+(?:,\d{3})*(?:(?<=\b\d\d)(?: \d{3})+|(?<=\b\d)(?: \d{3})+)?(?:\.\d+)?(?:[eE][-−+]?\d+)?)(?:\s?(K|M|B|GB|MB|MiB|GiB|KiB|TB|%|×|x)"
                    r"(?![A-Za-z]))?(?![\w]|-[A-Z](?![a-z])|\.\d)")
# a claim's unit -> the units a printed number may carry to support it, each with the factor to the claim's unit
# (None: a bare printed number, e.g. a byte count or a fraction, or a number whose unit is in a table's header, which is
# also taken as it is). A claim without a unit takes any printed one.
UNITS = {"×": {None: 1, "×": 1, "x": 1}, "x": {None: 1, "×": 1, "x": 1},
         "%": {"%": 1, None: 100}, "K": {None: 1e-3, "K": 1},
         "M": {None: 1e-6, "M": 1, "B": 1e3}, "B": {None: 1e-9, "B": 1, "M": 1e-3},
         "MB": {None: 1e-6, "MB": 1, "GB": 1e3}, "GB": {None: 1e-9, "GB": 1, "MB": 1e-3, "TB": 1e3},
         "TB": {None: 1e-12, "TB": 1, "GB": 1e-3}, "KiB": {None: 2**-10, "KiB": 1, "MiB": 2**10},
         "MiB": {None: 2**-20, "MiB": 1, "GiB": 2**10, "KiB": 2**-10}, "GiB": {None: 2**-30, "GiB": 1, "MiB": 2**-10}}
BINARY_THOUSAND = {"K": 2**-10}                        # "32K tokens" is 32768

# --- numbers every notebook may use: the presets and the paper constants the package carries -----------------------
PRESET_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "norm_eps",
                 "rope_theta", "sliding_window", "max_position_embeddings", "n_experts", "experts_per_token", "n_rep")
PACKAGE_NUMBERS = sorted({(float(getattr(preset(), name)), None) for preset in mt.presets.PRESETS.values()
                          for name in PRESET_FIELDS if getattr(preset(), name) is not None}
                         | {(float(v), "%") for row in routing.MIXTRAL_TABLE_5.values() for values in row.values()
                            for v in values}
                         | {(float(v), None) for v in routing.MIXTRAL_TABLE_5_LAYERS}, key=str)

# --- per notebook: numbers no output prints, each with its source ---------------------------------------------------
ALLOWED: dict[str, dict[str, str]] = {
    "04_sliding_window": {"134": "a line number of mistral-src's one_file_ref.py at commit 3dc8aed, cited (the cache)",
                          "4097": "W + 1 keys at Mistral 7B's W = 4096 (presets.mistral_7b_v0_1; Mistral 7B, Table 1)",
                          "1e-4": "the logits tolerance tests/test_reference_impl.py holds against mistral-inference"},
    "06_sparse_moe": {"17.80": "Shazeer et al. 2017, appendix A, Table 6: max(Load)/mean(Load) of MoE-256 without losses",
                      "1.14": "Shazeer et al. 2017, appendix A, Table 6: the same with w_importance = w_load = 0.1"},
    "08_mixtral_model": {"56": "8 x 7, the arithmetic of the name 8x7B that the text refutes (the cell prints 57.9 B)"},
    "09_routing_analysis": {"3.2": "Python's documentation of random.seed: 'Changed in version 3.2: Moved to the version 2 "
                                   "scheme which uses all of the bits in a string seed'"},
    "11_scale_out": {"80": "80 GB, the memory of an A100 80GB or H100 80GB (NVIDIA's data sheets); the figure draws it"},
}


def parse(text: str) -> float:
    return float(text.replace(",", "").replace(" ", "").replace("−", "-"))


def resolution(text: str) -> float:
    """Half a unit in the last place written: '93' -> 0.5, '46.7' -> 0.05, '1e-3' -> 0.5e-3."""
    mantissa, _, exponent = text.replace("−", "-").lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def claims(markdown: str) -> list[tuple[str, str | None]]:
    """(number as written, unit or None) for every number of a markdown cell that reads as a claim."""
    text = re.sub(r"10([⁻]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)", lambda m: "1e" + m.group(1).translate(SUPERSCRIPT), markdown)
    text = text.translate(SUPERSCRIPT)                                          # x², Rᵀ: attached to a letter
    for pattern in SKIP:
        text = pattern.sub(" ", text)
    return [(m.group(1), m.group(2)) for m in NUMBER.finditer(text)]


def printed_numbers(nb: dict) -> list[tuple[float, str | None]]:
    """Every number in the notebook's outputs (streams, text/plain, text/markdown), with the unit printed after it."""
    found = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = "".join(output.get("text", "")) + "".join(data.get("text/plain", "")) + "".join(
                data.get("text/markdown", ""))
            found += [(parse(m.group(1)), m.group(2)) for m in NUMBER.finditer(text)]
    return found


def supported(number: str, unit: str | None, values: list[tuple[float, str | None]]) -> bool:
    x, tolerance = abs(parse(number)), resolution(number) * (1 + 1e-9)
    for y, printed_unit in values:
        factors = [1 if unit is None else UNITS[unit].get(printed_unit)]
        if printed_unit is None:                      # a bare printed number: its unit may be in a table's header
            factors += [1, BINARY_THOUSAND.get(unit)]
        if any(f is not None and math.isclose(x, abs(y) * f, abs_tol=tolerance) for f in factors):
            return True
    return False


def unsupported_numbers(nb: dict, allowed: dict[str, str]) -> list[tuple[int, str]]:
    values = printed_numbers(nb) + PACKAGE_NUMBERS
    return [(i, number + (unit or "")) for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "markdown"
            for number, unit in claims("".join(cell["source"]))
            if number not in allowed and not supported(number, unit, values)]


BARE_REPR = re.compile(r"<[^<>\n]+ at 0x[0-9a-fA-F.]+>")


def bare_reprs(nb: dict) -> list[tuple[int, str]]:
    found = []
    for i, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
            found += [(i, m) for m in BARE_REPR.findall(text)]
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_number_in_the_prose_is_printed_or_sourced(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    missing = unsupported_numbers(nb, ALLOWED.get(path.stem, {}))
    assert not missing, (f"{path.name}: numbers in markdown that no output, preset or paper constant supports "
                         f"(print them from a cell, or add them to ALLOWED with their source): {missing}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_cell_shows_a_bare_object_repr(path):
    found = bare_reprs(json.loads(path.read_text(encoding="utf-8")))
    assert not found, f"{path.name}: cells whose output is a bare object repr (end them with ';'): {found}"


def test_the_checks_fail_on_the_old_mistakes():
    """The two checks catch what they are for: a setting typed into the prose, and a stray repr."""
    def notebook(markdown: str, printed: str) -> dict:
        return {"cells": [{"cell_type": "markdown", "source": [markdown]},
                          {"cell_type": "code", "source": ["..."], "outputs": [{"output_type": "stream",
                                                                             "name": "stdout", "text": [printed]}]}]}
    typed = notebook("The buffer wraps 16 times; about 94 GB in bf16; about 1e-3 on logits of ±40.",
                     "W = 512, the buffer wraps around 15 times, 93.4 GB of weights; max |diff| 2.1e-04, span ±38\n")
    assert [n for _, n in unsupported_numbers(typed, {})] == ["16", "94GB", "1e-3", "40"]
    assert unsupported_numbers(notebook("W = 512; 15 wraps; 93 GB; 131 K; 2e-4", "512 15 93.4 GB 131,072 2.1e-04\n"),
                               {}) == []
    assert unsupported_numbers(typed, {"16": "s", "94": "s", "1e-3": "s", "40": "s"}) == []
    assert unsupported_numbers(notebook("about 94 GB", "self: expert 2, 94 %\n"), {}) == [(0, "94GB")]   # not a %
    names = notebook("Mistral 7B (Jiang et al. 2023, §2.1, Fig 1, Table 5, eq. (6)) in `W = 8`, notebook 04, v0.1",
                     "nothing\n")
    assert unsupported_numbers(names, {}) == []
    seeded = {"cells": [{"cell_type": "code", "source": ["torch.manual_seed(0)"], "outputs": [
        {"output_type": "execute_result", "data": {"text/plain": ["<torch._C.Generator at 0x...>"]}}]}]}
    assert bare_reprs(seeded) == [(0, "<torch._C.Generator at 0x...>")]
