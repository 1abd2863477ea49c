"""An objective is one plug-in: its traits are declared once, in objectives/, and nothing else names it.

The library (card_megatron/ outside objectives/, and tools/) asks ``objective_traits(name)`` instead
of comparing objective names; a test greps it for comparisons. A toy fifth objective, registered
at run time, is taken by the config, the decoders and the builder without another change.
"""

import ast
import dataclasses
import os

import pytest

from card_megatron.config import ConfigError, load_config
from card_megatron.objectives import (
    OBJECTIVE_CLASSES,
    ObjectiveConfig,
    build_objective,
    objective_names,
    objective_traits,
)
from card_megatron.objectives import traits as traits_module
from card_megatron.objectives.arm import ArmObjective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_objective_declares_its_traits_once():
    assert objective_names() == ("card", "arm", "mdlm", "bd3lm")  # the order the config and the docs list
    keys = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    from card_megatron.inference.generate import DECODINGS

    for cls in OBJECTIVE_CLASSES:
        t = cls.traits
        assert objective_traits(t.name) is t
        assert set(t.exclusive_keys) <= keys, f"{t.name}: exclusive_keys name no objective.* key"
        assert set(t.decoders) <= set(DECODINGS), f"{t.name}: decoders must be inference/generate.DECODINGS"
    # What the rest of the code used to decide by name, now read from the traits.
    assert [objective_traits(n).causal_lm for n in objective_names()] == [True, True, False, False]
    assert [objective_traits(n).is_bound for n in objective_names()] == [False, False, True, True]
    assert [objective_traits(n).mask_kind for n in objective_names()] == ["causal", "causal", "full", "block"]
    assert [objective_traits(n).default_decoder for n in objective_names()] == ["card", "ar", "mdlm", "bd3lm"]
    assert [objective_traits(n).lm_eval_loglikelihood for n in objective_names()] == [
        "exact",
        "exact",
        "bound",
        "refused",
    ]


def test_an_unknown_objective_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown objective 'foo' \(known objectives: card, arm, mdlm, bd3lm\)"):
        objective_traits("foo")
    with pytest.raises(ConfigError, match=r"objective.name \('foo'\) must be one of card, arm, mdlm, bd3lm"):
        load_config(None, ["objective.name=foo"])


def test_traits_that_contradict_each_other_are_refused():
    with pytest.raises(ValueError, match="causal_lm needs causal attention"):
        dataclasses.replace(ArmObjective.traits, name="x", mask_kind="full")
    with pytest.raises(ValueError, match="mask_kind 'diagonal'"):
        dataclasses.replace(ArmObjective.traits, name="x", mask_kind="diagonal")


def test_a_fifth_objective_is_one_registration(monkeypatch):
    """A new objective class with its traits, once registered, is a config choice, builds, and gets its
    decoder; nothing else changes (docs/design.md, "Adding an objective")."""
    from card_megatron.config import config_help
    from card_megatron.inference.generate import resolve_decoding

    monkeypatch.setattr(traits_module, "_REGISTERED", dict(traits_module._REGISTERED))

    class EchoObjective(ArmObjective):
        traits = dataclasses.replace(ArmObjective.traits, name="echo", label="ECHO", decoder_note="echo: ar only")

    traits_module.register(EchoObjective)
    cfg = load_config(None, ["objective.name=echo", "model.seq_length=8"])
    assert isinstance(build_objective(cfg.objective, 8, 9, 10), EchoObjective)
    assert resolve_decoding("echo", None) == "ar"
    with pytest.raises(ValueError, match="does not fit this echo checkpoint: echo: ar only"):
        resolve_decoding("echo", "card")
    assert "(card | arm | mdlm | bd3lm | echo)" in config_help()
    with pytest.raises(ValueError, match="registered twice"):
        traits_module.register(type("Other", (ArmObjective,), {"traits": EchoObjective.traits}))


# --------------------------------------------------------------------------- no name comparisons


def _library_files():
    for top in ("card_megatron", "tools"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            rel = os.path.relpath(dirpath, REPO)
            if rel.split(os.sep)[:2] == ["card_megatron", "objectives"]:
                continue  # where objectives are declared
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def _strings(node):
    """The string constants of a literal: itself, or the elements (keys of a dict) of a tuple/list/set/dict."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if isinstance(node, ast.Dict):
        return [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return []


def objective_name_comparisons(path: str) -> list[str]:
    """``file:line: code`` of every comparison with an objective name (``== "card"``, ``in ("arm", "card")``)
    and every module-level table of objective names (``CAUSAL = ("arm", "card")``, ``{"bd3lm": 2}``).

    Three objectives share their names with their decoders (``--decoding card``), so a comparison whose
    other side is a decoding (``decoding``, a decode ``family``) is a decoder's, and a table that also
    names a decoder no objective is called (``ar``) lists decoders."""
    names = set(objective_names())
    decoders = {d for n in names for d in objective_traits(n).decoders}
    decoder_only = decoders - names
    source = open(path).read()
    tree = ast.parse(source)
    found = []

    def report(node):
        found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: {ast.get_source_segment(source, node)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, operand in enumerate(operands):
                strings = set(_strings(operand))
                if not strings & names or strings & decoder_only:
                    continue
                others = " ".join(ast.get_source_segment(source, o) or "" for j, o in enumerate(operands) if j != i)
                if "decod" not in others and "family" not in others:
                    report(node)
    for node in tree.body:  # module-level tables
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            strings = set(_strings(node.value))
            if isinstance(node.value, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and strings & names:
                if not strings & decoder_only:
                    report(node)
    return found


def test_the_library_compares_no_objective_names():
    found = [hit for path in _library_files() for hit in objective_name_comparisons(path)]
    assert not found, "ask objective_traits(name) instead of comparing objective names:\n" + "\n".join(found)


def test_the_grep_finds_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        'CAUSAL = ("arm", "card")\n'
        'SEQ = {"bd3lm": 2}\n'
        "def f(cfg, objective, decoding):\n"
        '    a = cfg.objective.name == "card"\n'
        '    b = objective in ("arm", "card")\n'
        '    c = "mdlm" != objective\n'
        '    d = decoding in ("card", "ar")\n'  # a decoder: not reported
        '    e = decoding == "mdlm"\n'  # a decoder: not reported
        "    return a, b, c, d, e\n"
    )
    lines = [hit.split(":")[1] for hit in objective_name_comparisons(str(bad))]
    assert sorted(lines, key=int) == ["1", "2", "4", "5", "6"]
