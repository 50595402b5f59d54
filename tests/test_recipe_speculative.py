"""The recipe's ``speculative`` section: defaults, each method's required key, and one clean error per bad value."""

from __future__ import annotations

import textwrap

import pytest

from zycompile import RecipeError, load_recipe
from zycompile.recipe import RECIPES_DIR


def _err(overrides, recipe="llama-tiny") -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, overrides)
    return str(info.value)


def test_defaults_off_and_round_trip():
    r = load_recipe("llama-tiny")
    assert r.speculative.method == "none" and r.speculative.num_tokens == 4
    again = load_recipe(r.to_dict())
    assert again.speculative == r.speculative and again.compute_hash() == r.compute_hash()


@pytest.mark.parametrize(
    "overrides",
    [
        {"speculative.method": "ngram", "speculative.num_tokens": 6, "speculative.ngram_max": 4},
        {"speculative.method": "draft_model", "speculative.draft_model": "tiny:llama?num_hidden_layers=1"},
        {"speculative.method": "early_exit", "speculative.exit_layer": 1, "speculative.adaptive": True},
        {"speculative.method": "eagle", "speculative.eagle_head": "heads/x.safetensors"},
    ],
)
def test_each_method_loads(overrides):
    r = load_recipe("llama-tiny", overrides)
    assert r.speculative.method == overrides["speculative.method"]


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        ({"speculative.method": "medusa"}, "speculative.method", "allowed: 'none', 'ngram'"),
        ({"speculative.num_tokens": 0}, "speculative.num_tokens", ">= 1"),
        ({"speculative.num_tokens": "four"}, "speculative.num_tokens", "expected an integer"),
        ({"speculative.min_tokens": 5}, "speculative.min_tokens", "[1, num_tokens]"),
        ({"speculative.ngram_min": 4}, "speculative.ngram_min", "ngram_min <= ngram_max"),
        ({"speculative.adaptive": "yes"}, "speculative.adaptive", "boolean"),
        ({"speculative.method": "draft_model"}, "speculative.draft_model", "needs speculative.draft_model"),
        ({"speculative.method": "early_exit"}, "speculative.exit_layer", "needs speculative.exit_layer"),
        ({"speculative.method": "eagle"}, "speculative.eagle_head", "needs speculative.eagle_head"),
        ({"speculative.exit_layer": 0}, "speculative.exit_layer", ">= 1"),
        ({"speculative.lookup_tokens": -1}, "speculative.lookup_tokens", ">= 0 (0 turns it off)"),
        ({"speculative.tree": [2, 0]}, "speculative.tree", "each >= 1, at most 15 nodes"),
        ({"speculative.tree": [8, 8]}, "speculative.tree", "got [8, 8]"),
        ({"speculative.tree": "wide"}, "speculative.tree", "expected"),
        ({"speculative.tree_max_batch": 0}, "speculative.tree_max_batch", ">= 1"),
        ({"speculative.draft": "x"}, "speculative.draft", "did you mean 'draft_model'"),
    ],
)
def test_bad_values_name_file_key_and_allowed(overrides, key, fragment):
    msg = _err(overrides)
    assert "llama-tiny.yaml" in msg and f"{key}:" in msg and fragment in msg
    assert "\n" not in msg


def test_yaml_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            model: {source: tiny:llama}
            lowering: {backend: aot_eager}
            speculative: {method: ngram, num_tokens: 3, adaptive: true, min_tokens: 2}
            """
        )
    )
    s = load_recipe(path).speculative
    assert (s.method, s.num_tokens, s.adaptive, s.min_tokens) == ("ngram", 3, True, 2)
    path.write_text("speculative: {method: eagle}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: speculative\.eagle_head: missing"):
        load_recipe(path)


def test_shipped_speculative_recipes_point_at_existing_files():
    for path in RECIPES_DIR.glob("*.yaml"):
        r = load_recipe(path)
        if r.speculative.method == "eagle":
            assert (path.parent / r.speculative.eagle_head).is_file(), path
