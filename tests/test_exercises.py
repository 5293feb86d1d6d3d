"""The exercises (mistral_tutorial/exercises): every solution passes its check, every wrong answer fails it (the classic
mistakes each exercise names, and generic ones: the output x 1.001, zeros, transposed, the wrong dtype, the wrong shape,
whichever apply), every message prints, the references agree with transformers where it has the same function, and
the notebooks hold every exercise exactly once, as a stub that a fresh run leaves "not attempted"."""

from __future__ import annotations

import ast
import contextlib
import html
import inspect
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mistral_tutorial as mt
from mistral_tutorial.exercises import EXERCISES, solution_function
from mistral_tutorial.exercises.checker import _copy
from mistral_tutorial.exercises.compare import difference

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

NAMES = mt.exercises.names()
NOTEBOOKS = {p.name.split("_")[0]: p for p in tasks.notebook_paths()}      # "01" ... "08b" ... "12"
CHECK_CALL = re.compile(r"mt\.exercises\.check\(\s*[\"']([^\"']+)[\"']\s*,\s*(\w+)\s*\)")


def run(name: str, fn) -> tuple[bool, str]:
    """check(name, fn) with its printout captured."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        passed = mt.exercises.check(name, fn)
    return passed, out.getvalue()


# -- wrong answers made from the solution ---------------------------------------------------------------------------
def _on_first_leaf(value, change):
    """`value` with `change` applied to its first tensor, number or string (inside tuples, lists and dicts)."""
    if isinstance(value, (tuple, list)):
        return type(value)([_on_first_leaf(value[0], change), *value[1:]]) if value else value
    if isinstance(value, dict):
        first = next(iter(value))
        return {**value, first: _on_first_leaf(value[first], change)}
    return change(value)


def _scaled(v):
    if isinstance(v, torch.Tensor):
        return v * 1.001 if v.is_floating_point() else (~v if v.dtype == torch.bool else v + 1)
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v + 1                                              # an integer answer off by one
    return v * 1.001 if isinstance(v, float) else v + " "


def _zeros(v):
    if isinstance(v, torch.Tensor):
        return torch.zeros_like(v)
    return type(v)() if isinstance(v, (int, float, str)) else v


def _transposed(v):
    return v.transpose(-2, -1) if isinstance(v, torch.Tensor) and v.dim() >= 2 else v


def _wrong_dtype(v):
    if isinstance(v, torch.Tensor):
        if v.is_floating_point():
            return v.float() if v.dtype == torch.float64 else v.double()
        return v.long() if v.dtype == torch.bool else v.float()
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _wrong_shape(v):
    return v.unsqueeze(0) if isinstance(v, torch.Tensor) else v


GENERIC = {"x 1.001 (or off by one)": _scaled, "zeros": _zeros, "transposed": _transposed,
           "wrong dtype": _wrong_dtype, "wrong shape": _wrong_shape}


def generic_wrong_answers(name: str) -> dict:
    """The generic wrong answers that change the solution's output on at least one of the exercise's cases."""
    exercise, solution = EXERCISES[name], solution_function(name)
    outputs = [(case, solution(*_copy(case.args))) for case in exercise.cases()]
    wrong = {}
    for label, change in GENERIC.items():
        if any(difference(out, _on_first_leaf(out, change)) is not None for _, out in outputs):
            wrong[label] = lambda *args, change=change: _on_first_leaf(solution(*args), change)
    return wrong


# -- every exercise -------------------------------------------------------------------------------------------------
def test_names_are_ids_of_notebooks():
    assert len(NAMES) == len(set(NAMES)) >= 33
    for name in NAMES:
        assert re.fullmatch(r"\d\d\.\d-[a-z0-9]+(-[a-z0-9]+)*", name), name
        assert name[:2] in NOTEBOOKS and "01" <= name[:2] <= "12", name
    assert NAMES == sorted(NAMES, key=lambda n: (n[:2], int(n[3:n.index("-")])))


@pytest.mark.parametrize("name", NAMES)
def test_the_solution_passes(name):
    passed, printed = run(name, solution_function(name))
    assert passed, printed
    assert printed.startswith(f"✓ {name}: passed all {len(EXERCISES[name].cases())} cases"), printed


@pytest.mark.parametrize("name", NAMES)
def test_each_classic_mistake_fails_and_its_hint_names_it(name):
    exercise = EXERCISES[name]
    assert exercise.mistakes, f"{name}: no classic mistake to recognise"
    for hint, mistake in exercise.mistakes.items():
        passed, printed = run(name, mistake)
        assert not passed, f"{name}: the mistake '{hint}' passes"
        assert f"this looks like a classic mistake: {hint}" in printed, printed


@pytest.mark.parametrize("name", NAMES)
def test_generic_wrong_answers_fail(name):
    wrong = generic_wrong_answers(name)
    assert len(wrong) >= 2, f"{name}: only {sorted(wrong)} apply"
    for label, fn in wrong.items():
        passed, printed = run(name, fn)
        assert not passed, f"{name}: the solution made wrong ({label}) still passes"
        assert printed.startswith(f"✗ {name}: wrong on case"), printed
        assert "expected:" in printed and "got:" in printed and "hint:" in printed, printed


@pytest.mark.parametrize("name", NAMES)
def test_a_stub_is_not_attempted_and_an_error_is_the_learners_own(name):
    def stub(*args):
        raise NotImplementedError("your code here")

    passed, printed = run(name, stub)
    assert not passed and printed.startswith(f"· {name}: not attempted yet"), printed

    def broken(*args):
        return undefined_name_in_the_learners_code(*args)  # noqa: F821

    passed, printed = run(name, broken)
    assert not passed, printed
    assert f"✗ {name}: your function raised NameError on case 1" in printed, printed
    assert "undefined_name_in_the_learners_code" in printed and "in broken" in printed, printed
    assert "checker.py" not in printed and "input:" in printed, printed


@pytest.mark.parametrize("name", NAMES)
def test_hint_and_solution_print(name):
    exercise = EXERCISES[name]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        mt.exercises.hint(name)
        mt.exercises.solution(name)
    printed = out.getvalue()
    assert exercise.hint in printed and exercise.more in printed
    assert f"def {exercise.function}(" in printed and "solutions/nb" in printed


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="did you mean .*03.2-repeat-kv"):
        mt.exercises.check("03.2-repeat_kv", lambda x, n: x)
    with pytest.raises(TypeError, match="takes your function itself"):
        mt.exercises.check("03.2-repeat-kv", "repeat_kv")
    with pytest.raises(TypeError, match="is a str"):
        mt.exercises.hint(3)


def test_a_wrong_answer_is_shown_small_and_exactly():
    def sliding_window_mask(seq_len, window):
        return mt.sliding_window_mask(seq_len, None if window is None else window + 1)

    passed, printed = run("04.1-window-mask", sliding_window_mask)
    assert not passed
    assert "input:    seq_len = 7; window = 3" in printed                          # the learner's own argument names
    assert "row i = query i:\n      1......\n      11.....\n      111....\n      .111..." in printed   # the mask drawn
    assert "4 of 49 entries differ, the first at [3, 0]: expected False, got True" in printed
    assert "the window holds W + 1 keys" in printed


def test_checks_are_cheap():
    import time

    for name in NAMES:
        run(name, solution_function(name))                                          # warm: imports, the meta device
    slow = {}
    for name in NAMES:
        start = time.perf_counter()
        run(name, solution_function(name))
        if (seconds := time.perf_counter() - start) > 1.0:
            slow[name] = round(seconds, 2)
    assert not slow, f"checks slower than a second: {slow}"


# -- the references against transformers and published numbers ------------------------------------------------------
def _cases(name):
    return [_copy(case.args) for case in EXERCISES[name].cases()]


def test_references_agree_with_transformers():
    from transformers import MistralConfig, MixtralConfig
    from transformers.models.mistral import modeling_mistral as hf_mistral
    from transformers.models.mixtral import modeling_mixtral as hf_mixtral

    for x, weight, eps in _cases("01.2-rms-norm"):
        norm = hf_mistral.MistralRMSNorm(x.shape[-1], eps).to(x.dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
            assert difference(norm(x), EXERCISES["01.2-rms-norm"].reference(x, weight, eps)) is None
    for (x,) in _cases("02.2-rotate-half"):
        assert torch.equal(hf_mistral.rotate_half(x), mt.rotate_half(x))
    for x, positions, base in _cases("02.3-apply-rope"):
        if x.dtype != torch.float32:
            continue
        config = MistralConfig(hidden_size=x.shape[-1], num_attention_heads=1, head_dim=x.shape[-1], rope_theta=base)
        cos, sin = hf_mistral.MistralRotaryEmbedding(config)(x, positions[None])
        hf_q, _ = hf_mistral.apply_rotary_pos_emb(x, x, cos, sin)
        torch.testing.assert_close(hf_q, EXERCISES["02.3-apply-rope"].reference(x, positions, base))
    for x, n_rep in _cases("03.2-repeat-kv"):
        assert torch.equal(hf_mistral.repeat_kv(x, n_rep), mt.repeat_kv(x, n_rep))
    for x, w1, w2, w3 in _cases("05.2-swiglu"):
        mlp = hf_mistral.MistralMLP(MistralConfig(hidden_size=w1.shape[1], intermediate_size=w1.shape[0])).to(x.dtype)
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(w1), mlp.down_proj.weight.copy_(w2), mlp.up_proj.weight.copy_(w3)
            assert difference(mlp(x), EXERCISES["05.2-swiglu"].reference(x, w1, w2, w3)) is None
    for logits, k in _cases("06.1-top-k-routing"):
        n_experts = logits.shape[1]
        router = hf_mixtral.MixtralTopKRouter(MixtralConfig(hidden_size=n_experts, num_local_experts=n_experts,
                                                            num_experts_per_tok=k))
        with torch.no_grad():
            router.weight.copy_(torch.eye(n_experts))                           # router logits = its input
            _, hf_weights, hf_experts = router(logits.float())
        weights, experts = mt.route_paper(logits, k)
        assert torch.equal(hf_experts, experts) and torch.equal(mt.route(logits, k)[1], experts)
        torch.testing.assert_close(hf_weights, weights)
    for logits, n_experts, k in _cases("06.2-load-balancing-loss"):
        torch.testing.assert_close(hf_mixtral.load_balancing_loss_func((logits,), n_experts, k),
                                   mt.load_balancing_loss(logits, n_experts, k))
    for x, gate, w1, w2, w3, k in _cases("08.3-moe-forward"):
        n_experts, hidden, dim = w1.shape
        block = hf_mixtral.MixtralSparseMoeBlock(MixtralConfig(hidden_size=dim, intermediate_size=hidden,
                                                               num_local_experts=n_experts, num_experts_per_tok=k))
        with torch.no_grad():
            block.gate.weight.copy_(gate)
            block.experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
            block.experts.down_proj.copy_(w2)
            torch.testing.assert_close(block(x[None])[0], EXERCISES["08.3-moe-forward"].reference(x, gate, w1, w2, w3, k))


def test_noisy_gating_reference_is_the_library_gate_with_its_own_draws():
    """06.3 hands the gate the case's noise; with the same seed, the gate's own draws give the same gates."""
    for x, w_gate, w_noise, noise, k in _cases("06.3-noisy-top-k-gating"):
        gate = mt.NoisyTopKGate(x.shape[1], w_gate.shape[1], k).train()
        with torch.no_grad():
            gate.w_gate.copy_(w_gate), gate.w_noise.copy_(w_noise)
            torch.manual_seed(7)
            drawn = torch.randn(noise.shape)
            torch.manual_seed(7)
            own, _ = gate(x)
        assert torch.equal(own, EXERCISES["06.3-noisy-top-k-gating"].reference(x, w_gate, w_noise, drawn, k))


def test_references_agree_with_published_and_measured_numbers():
    width = EXERCISES["05.4-llama-hidden-dim"].reference
    assert [width(d, 256) for d in (4096, 5120, 6656, 8192)] == [11008, 13824, 17920, 22016]   # LLaMA 7B-65B
    assert EXERCISES["04.2-receptive-field"].reference(4, 3) == 3 * (4 - 1) + 1
    total, active = EXERCISES["08.1-moe-parameters"].reference(mt.presets.mixtral_8x7b_v0_1())
    assert round(total / 1e9, 1) == 46.7 and round(active / 1e9, 1) == 12.9
    assert EXERCISES["09.4-random-baseline"].reference(8, 2) == pytest.approx((1 / 8, 1 - 15 / 28))
    # 11.1's counts are the bytes step_traffic measures: each rank sends its off-diagonal row, and returns its column
    tiny = mt.ModelConfig(vocab_size=4, dim=6, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, hidden_dim=2,
                          n_experts=8, experts_per_token=2, sliding_window=None)
    for experts, n_experts, world_size in _cases("11.1-dispatch-counts"):
        if n_experts != 8 or experts.shape[1] != 2:
            continue
        counts = EXERCISES["11.1-dispatch-counts"].reference(experts, n_experts, world_size)
        for rank in range(world_size):
            bytes_sent = mt.parallel_costs.step_traffic(tiny, "expert", world_size, experts.shape[0], 4, [experts], rank)
            pairs = counts[rank].sum() + counts[:, rank].sum() - 2 * counts[rank, rank]
            index_bytes = (world_size - 1) * (n_experts // world_size) * 8
            assert bytes_sent["all_to_all"] == index_bytes + int(pairs) * tiny.dim * 4
    assert EXERCISES["11.4-ring-all-reduce"].reference(12, 3) == 2 * 2 / 3 * 12


def test_quantization_references_agree_with_gguf():
    """12.1's and 12.3's references (the library's unpacking) give gguf.quants.dequantize's values bit for bit; 12.2's,
    with groups of 32 and the scale stored in fp16, is gguf's Q8_0 byte for byte; 12.4's (gguf's own) scales and mins
    rebuild the library's Q4_K weights."""
    import gguf

    for name, qtype in (("12.1-q8-0-dequantize", "Q8_0"), ("12.3-q4-0-dequantize", "Q4_0")):
        for (blocks,) in _cases(name):
            theirs = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype])
            ours = EXERCISES[name].reference(blocks)
            assert torch.equal(ours.view(torch.int32), torch.from_numpy(theirs.copy()).view(torch.int32)), name
    for weight, group_size in _cases("12.2-absmax-int8-groups"):
        if group_size != 32:
            continue
        q, scale = EXERCISES["12.2-absmax-int8-groups"].reference(weight, group_size)
        blocks = torch.from_numpy(gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)).reshape(-1, 34)
        assert torch.equal(blocks[:, :2].contiguous().view(torch.float16).flatten(), scale.half().flatten())
        assert torch.equal(blocks[:, 2:].contiguous().view(torch.int8), q.reshape(-1, 32))
    for (scales,) in _cases("12.4-q4-k-scales"):
        n = scales.shape[0]
        blocks = torch.randint(0, 256, (n, 144), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        blocks[:, 0:4] = torch.tensor([[0.5, 0.25]]).half().view(torch.uint8)             # d, dmin
        blocks[:, 4:16] = scales
        sc, mins = EXERCISES["12.4-q4-k-scales"].reference(scales)                     # (n, 8) each
        chunks = blocks[:, 16:].reshape(n, 4, 32)                                       # sub-blocks 2c (low), 2c + 1
        q = torch.stack([chunks & 15, chunks >> 4], dim=2).reshape(n, 8, 32).float()
        weights = (0.5 * sc.float())[..., None] * q - (0.25 * mins.float())[..., None]  # (d sc) q - dmin m
        assert torch.equal(weights.reshape(n, 256), mt.quantized.unpack(blocks, "Q4_K", 256))


# -- the notebooks --------------------------------------------------------------------------------------------------
def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


def _checks(path: Path) -> list[tuple[str, str, int]]:
    """(exercise id, function name, index among the code cells) of every check call in a notebook."""
    return [(m.group(1), m.group(2), i) for i, c in enumerate(_code_cells(path))
            for m in CHECK_CALL.finditer("".join(c["source"]))]


def test_every_exercise_is_in_exactly_one_notebook_and_each_notebook_has_three():
    seen: dict[str, list[str]] = {}
    for number, path in NOTEBOOKS.items():
        found = _checks(path)
        for name, _, _ in found:
            seen.setdefault(name, []).append(number)
        if number.isdigit() and 1 <= int(number) <= 12:     # 08b (training) has none
            assert len({name for name, _, _ in found}) >= 3, f"{path.name}: fewer than three exercises"
    assert sorted(seen) == sorted(NAMES), f"missing: {set(NAMES) - set(seen)}, unknown: {set(seen) - set(NAMES)}"
    for name, where in seen.items():
        assert where == [name.split(".")[0]], f"{name} is checked in notebooks {where}"


@pytest.mark.parametrize("number", sorted(n for n in NOTEBOOKS if n.isdigit() and 1 <= int(n) <= 12))
def test_the_stubs_are_not_attempted_and_match_the_solutions(number):
    path = NOTEBOOKS[number]
    cells = _code_cells(path)
    others = set()
    for cell in cells:
        source = "".join(cell["source"])
        assert "mt.exercises.solution(" not in source, f"{path.name}: a solution is printed in a committed cell"
        if not CHECK_CALL.search(source) and "NotImplementedError" not in source:
            tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
            others |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            others |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for name, function, index in _checks(path):
        exercise = EXERCISES[name]
        assert function == exercise.function, f"{name}: the check passes {function}, the exercise is {exercise.function}"
        assert function not in others, f"{path.name}: the stub {function} shadows a name the notebook's cells use"
        stub_cell, check_cell = cells[index - 1], cells[index]
        assert "NBVAL_CHECK_OUTPUT" not in "".join(check_cell["source"]), f"{name}: nbval would compare the verdict"
        namespace = {"torch": torch, "mt": mt, "F": F, "math": math}
        exec("".join(stub_cell["source"]), namespace)                               # the stub cell as a learner finds it
        stub = namespace[function]
        assert _parameters(stub) == _parameters(solution_function(name)), f"{name}: the stub's arguments"
        passed, printed = run(name, stub)
        assert not passed and "not attempted" in printed
        committed = "".join("".join(o.get("text", "")) for o in check_cell.get("outputs", []))
        assert "not attempted" in committed, f"{path.name}: {name}'s committed check says {committed!r}"


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_static_site_shows_the_exercises_but_not_the_solutions():
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_site
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    path = NOTEBOOKS["05"]
    exporter = HTMLExporter(template_file="site.html.j2", extra_loaders=[DictLoader({"site.html.j2": build_site.TEMPLATE})])
    body, _ = exporter.from_notebook_node(build_site.static_outputs(nbformat.read(path, as_version=4), path.parent),
                                          resources={"metadata": {"name": path.stem, "path": str(path.parent)},
                                                     "site_nav": ""})
    text = html.unescape(re.sub(r"<[^>]+>", "", body))
    for name, function, _ in _checks(path):
        assert f"def {function}(" in text and name in text, f"{name}: not on the page"
        body_lines = [line.split("#")[0].strip() for line in inspect.getsource(solution_function(name)).splitlines()[1:]]
        shown = [line for line in body_lines if len(line) >= 20 and line in text]
        assert not shown, f"{name}: the site shows lines of the solution: {shown}"
    assert "not attempted" in text and "Solutions to notebook" not in text


def test_readme_counts_the_exercises():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Exercises" in readme and "mt.exercises.hint" in readme and "exercises/solutions/" in readme
    assert f": {len(NAMES)} in all" in readme
    table = readme.split("## The walkthrough", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    column = header.index("exercises")
    counted = {}
    for line in table[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        counted[re.search(r"\[(\d\d\w?)_", cells[0]).group(1)] = cells[column]
    for number in NOTEBOOKS:
        expected = sum(name.split(".")[0] == number for name in NAMES)
        assert counted[number] == (str(expected) if expected else "–"), f"README: notebook {number}"
