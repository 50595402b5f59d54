"""Recipe loading: every bad input is one clean RecipeError naming the file, the key path and the value.

Also: ``--set`` overrides (list and dict form), the stable recipe hash, the YAML round trip, and that every
shipped recipe in ``recipes/`` loads.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
import yaml

import zycompile
from zycompile import RecipeError, load_recipe
from zycompile.errors import ZyError
from zycompile.passes import PASS_REGISTRY
from zycompile.passes.base import GraphPass
from zycompile.recipe import RECIPES_DIR, Recipe, from_dict

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))

# A valid recipe the bad cases are variations of.
GOOD = """\
model:
  source: tiny:llama
  dtype: float32
parallel:
  mode: none
  degree: 1
passes:
  - name: canonicalize_attention
  - name: fuse_projections
lowering:
  backend: aot_eager
  mode: default
  options: {}
runtime:
  max_seq_len: 256
  batch_buckets: [1, 2, 4]
  prefill_buckets: [16, 64]
  graphs: auto
  threads: null
debug:
  dump_dir: null
  strict: true
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(recipe, overrides=None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, overrides)
    return info.value


def assert_clean(err: BaseException) -> None:
    """One RecipeError with a one-line message, not chained from an internal exception."""
    assert type(err) is RecipeError
    assert isinstance(err, ZyError)
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__
    msg = str(err)
    assert msg and "\n" not in msg, msg
    assert "Traceback" not in msg


def test_good_recipe_loads(tmp_path):
    path = write(tmp_path, GOOD)
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    assert r.source_file == str(path)
    assert r.model.source == "tiny:llama"
    assert [p.name for p in r.passes] == ["canonicalize_attention", "fuse_projections"]
    assert r.runtime.batch_buckets == (1, 2, 4)
    assert r.runtime.prefill_buckets == (16, 64)
    assert r.lowering.backend == "aot_eager"
    assert r.debug.strict is True
    assert r.pass_spec("fuse_projections").name == "fuse_projections"
    assert r.pass_spec("nope") is None


def test_empty_file_is_all_defaults(tmp_path):
    r = load_recipe(write(tmp_path, ""))
    assert dataclasses.replace(r, source_file=None) == Recipe()
    assert r.passes == ()


# --- bad recipes ---------------------------------------------------------------------------------
# (id, yaml text, key path, bad value as it appears in the message, further fragments)
BAD = [
    # unknown keys
    ("unknown-top-level", "serving: {port: 8000}\n", "serving", "'serving'", ["unknown key"]),
    ("top-level-typo-passes", "pases: []\n", "pases", "'pases'", ["did you mean 'passes'"]),
    (
        "unknown-nested",
        "runtime:\n  max_seq_lne: 512\n",
        "runtime.max_seq_lne",
        "'max_seq_lne'",
        ["unknown key", "did you mean 'max_seq_len'", "allowed:", "prefill_buckets"],
    ),
    ("unknown-nested-model", "model:\n  dtyp: float32\n", "model.dtyp", "'dtyp'", ["did you mean 'dtype'"]),
    # wrong types
    (
        "str-for-int",
        "runtime:\n  max_seq_len: big\n",
        "runtime.max_seq_len",
        "'big' (str)",
        ["expected an integer"],
    ),
    ("int-for-bool", "debug:\n  strict: 1\n", "debug.strict", "1 (int)", ["expected a boolean"]),
    ("str-for-bool", "debug:\n  strict: 'true'\n", "debug.strict", "'true' (str)", ["expected a boolean"]),
    ("list-for-mapping", "runtime: [1, 2]\n", "runtime", "[1, 2] (list)", ["expected a mapping"]),
    (
        "mapping-for-list",
        "runtime:\n  batch_buckets: {a: 1}\n",
        "runtime.batch_buckets",
        "{'a': 1} (dict)",
        ["expected a list"],
    ),
    (
        "null-for-required-int",
        "runtime:\n  max_seq_len: null\n",
        "runtime.max_seq_len",
        "null",
        ["expected an integer"],
    ),
    ("null-for-str", "model:\n  source: ~\n", "model.source", "null", ["expected a string"]),
    (
        "bool-for-int",
        "runtime:\n  max_seq_len: true\n",
        "runtime.max_seq_len",
        "True (bool)",
        ["expected an integer"],
    ),
    (
        "float-for-int",
        "parallel:\n  degree: 2.5\n",
        "parallel.degree",
        "2.5 (float)",
        ["expected an integer"],
    ),
    (
        "bad-list-element",
        "runtime:\n  batch_buckets: [1, two, 4]\n",
        "runtime.batch_buckets[1]",
        "'two' (str)",
        ["expected an integer"],
    ),
    ("int-for-str", "debug:\n  dump_dir: 5\n", "debug.dump_dir", "5 (int)", ["expected a string"]),
    (
        "list-for-options",
        "lowering:\n  options: [max_autotune]\n",
        "lowering.options",
        "['max_autotune'] (list)",
        ["expected a mapping"],
    ),
    # Literal values
    ("dtype", "model:\n  dtype: float64\n", "model.dtype", "'float64'", ["'float32'", "'bfloat16'"]),
    ("parallel-mode", "parallel:\n  mode: pp\n", "parallel.mode", "'pp'", ["'none'", "'tp'", "'tsp'"]),
    (
        "lowering-backend",
        "lowering:\n  backend: tensorrt\n",
        "lowering.backend",
        "'tensorrt'",
        ["'inductor'", "'aot_eager'", "'eager'"],
    ),
    (
        "lowering-mode",
        "lowering:\n  mode: reduce-overhead\n",
        "lowering.mode",
        "'reduce-overhead'",
        ["'default'", "'max-autotune'"],
    ),
    (
        "runtime-graphs",
        "runtime:\n  graphs: maybe\n",
        "runtime.graphs",
        "'maybe'",
        ["'auto'", "'on'", "'off'"],
    ),
    ("runtime-graphs-int", "runtime:\n  graphs: 1\n", "runtime.graphs", "1 (int)", ["allowed"]),
    ("runtime-graphs-bool", "runtime:\n  graphs: true\n", "runtime.graphs", "True (bool)", ["allowed"]),
    # passes
    (
        "unknown-pass",
        "passes:\n  - name: fuse_everything\n",
        "passes[0].name",
        "'fuse_everything'",
        ["unknown pass", "allowed:", "canonicalize_attention", "fuse_projections"],
    ),
    (
        "unknown-pass-second",
        "passes:\n  - name: canonicalize_attention\n  - attention_sinks\n",
        "passes[1].name",
        "'attention_sinks'",
        ["unknown pass", "canonicalize_attention"],
    ),
    (
        "unknown-pass-option",
        "passes:\n  - {name: canonicalize_attention, split_kv: 4}\n",
        "passes[0].split_kv",
        "'split_kv'",
        ["unknown key", "allowed: none"],
    ),
    (
        "pass-entry-list",
        "passes:\n  - [canonicalize_attention]\n",
        "passes[0]",
        "['canonicalize_attention'] (list)",
        ["expected a mapping with a 'name' key"],
    ),
    ("pass-entry-int", "passes:\n  - 3\n", "passes[0]", "3 (int)", ["expected a mapping"]),
    (
        "pass-without-name",
        "passes:\n  - {split_kv: 4}\n",
        "passes[0].name",
        "{'split_kv': 4}",
        ["missing required key"],
    ),
    ("pass-name-int", "passes:\n  - name: 7\n", "passes[0].name", "7", ["unknown pass"]),
    (
        "passes-mapping",
        "passes:\n  name: canonicalize_attention\n",
        "passes",
        "{'name': 'canonicalize_attention'} (dict)",
        ["expected a list"],
    ),
    (
        "duplicate-pass",
        "passes:\n  - canonicalize_attention\n  - fuse_projections\n  - name: canonicalize_attention\n",
        "passes[2].name",
        "'canonicalize_attention'",
        ["listed twice"],
    ),
    # cross-field rules
    (
        "mode-none-degree-2",
        "parallel:\n  mode: none\n  degree: 2\n",
        "parallel.degree",
        "got 2",
        ["'none'", "needs degree 1"],
    ),
    ("tp-degree-1", "parallel:\n  mode: tp\n  degree: 1\n", "parallel.degree", "got 1", ["'tp'", ">= 2"]),
    ("tsp-degree-1", "parallel:\n  mode: tsp\n", "parallel.degree", "got 1", ["'tsp'", ">= 2"]),
    ("degree-0", "parallel:\n  degree: 0\n", "parallel.degree", "got 0", [">= 1"]),
    (
        "prefill-over-max-seq-len",
        "runtime:\n  max_seq_len: 128\n  prefill_buckets: [16, 64, 256]\n",
        "runtime.prefill_buckets",
        "[16, 64, 256]",
        ["runtime.max_seq_len (128)"],
    ),
    (
        "unsorted-batch-buckets",
        "runtime:\n  batch_buckets: [4, 2, 8]\n",
        "runtime.batch_buckets",
        "[4, 2, 8]",
        ["strictly increasing"],
    ),
    (
        "duplicate-batch-buckets",
        "runtime:\n  batch_buckets: [1, 2, 2, 4]\n",
        "runtime.batch_buckets",
        "[1, 2, 2, 4]",
        ["strictly increasing"],
    ),
    (
        "zero-prefill-bucket",
        "runtime:\n  prefill_buckets: [0, 16]\n",
        "runtime.prefill_buckets",
        "[0, 16]",
        ["positive"],
    ),
    (
        "empty-batch-buckets",
        "runtime:\n  batch_buckets: []\n",
        "runtime.batch_buckets",
        "empty list",
        ["at least one bucket"],
    ),
    (
        "empty-prefill-buckets",
        "runtime:\n  prefill_buckets: []\n",
        "runtime.prefill_buckets",
        "empty list",
        ["at least one bucket"],
    ),
    ("negative-threads", "runtime:\n  threads: -2\n", "runtime.threads", "-2", [">= 1 or null"]),
    ("zero-threads", "runtime:\n  threads: 0\n", "runtime.threads", "got 0", [">= 1"]),
    (
        "negative-prefix-cache",
        "runtime:\n  prefix_cache_mb: -1\n",
        "runtime.prefix_cache_mb",
        "got -1",
        [">= 0", "0 turns it off"],
    ),
    (
        "negative-mixed-prefill",
        "runtime:\n  mixed_prefill_tokens: -4\n",
        "runtime.mixed_prefill_tokens",
        "got -4",
        [">= 0", "0 turns mixed steps off"],
    ),
    ("tiny-max-seq-len", "runtime:\n  max_seq_len: 1\n", "runtime.max_seq_len", "got 1", [">= 2"]),
    # Inductor options
    (
        "unknown-inductor-option",
        "lowering:\n  options:\n    max_autotun: true\n",
        "lowering.options.max_autotun",
        "'max_autotun'",
        ["torch._inductor.config", "did you mean 'max_autotune'"],
    ),
]


@pytest.mark.parametrize(
    ("text", "key_path", "value", "extra"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_recipe(tmp_path, text, key_path, value, extra):
    path = write(tmp_path, text)
    err = load_error(path)
    msg = str(err)
    assert msg.startswith(f"{path}: "), msg  # (a) the file
    assert re.search(rf"(^|: ){re.escape(key_path)}: ", msg), f"key path {key_path!r} not in {msg!r}"  # (b)
    assert value in msg, f"value {value!r} not in {msg!r}"  # (c)
    for fragment in extra:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert_clean(err)


def test_bad_recipe_count():
    assert len(BAD) >= 25


def test_bad_values_in_a_full_recipe_name_the_right_key(tmp_path):
    # The same rule deep inside an otherwise good recipe names only the offending key.
    path = write(tmp_path, GOOD.replace("max_seq_len: 256", "max_seq_len: 32"))
    msg = str(load_error(path))
    assert f"{path}: runtime.prefill_buckets: got [16, 64]" in msg
    assert "(32)" in msg


def test_post_grad_pass_needs_a_compiling_backend(tmp_path, monkeypatch):
    class PostGrad(GraphPass):
        name = "test_post_grad"
        stage = "post_grad"

    monkeypatch.setitem(PASS_REGISTRY, PostGrad.name, PostGrad)
    path = write(tmp_path, "passes: [canonicalize_attention, test_post_grad]\nlowering: {backend: eager}\n")
    msg = str(load_error(path))
    assert msg.startswith(f"{path}: passes[1].name: ")
    assert "'test_post_grad'" in msg and "got 'eager'" in msg
    write(tmp_path, "passes: [test_post_grad]\nlowering: {backend: aot_eager}\n", "ok.yaml")
    assert load_recipe(tmp_path / "ok.yaml").passes[0].name == "test_post_grad"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("runtime:\n  max_seq_len: [1, 2\n", 3),
        ("model:\n  dtype: float32\n\tbad: 1\n", 3),
        ("model: source: x\n", 1),
        ("model:\n  source: x\n  dtype: 'float32\n", 4),
    ],
    ids=["unclosed-list", "tab", "nested-colon", "unclosed-quote"],
)
def test_malformed_yaml(tmp_path, text, line):
    path = write(tmp_path, text)
    err = load_error(path)
    msg = str(err)
    assert msg.startswith(f"{path}: malformed YAML at line {line}, column "), msg
    assert_clean(err)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    err = load_error(path)
    msg = str(err)
    assert msg.startswith(f"{path}: recipe file not found")
    for shipped in SHIPPED:
        assert shipped.stem in msg  # lists what could have been meant
    assert_clean(err)


def test_unknown_shipped_name():
    msg = str(load_error("no-such-recipe"))
    assert msg.startswith("no-such-recipe: recipe file not found")
    assert "smollm2-135m" in msg


def test_unreadable_path(tmp_path):
    err = load_error(tmp_path)  # a directory exists but is not a file
    assert str(err).startswith(f"{tmp_path}: cannot read recipe file")
    assert_clean(err)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("- model\n- runtime\n", "['model', 'runtime'] (list)"),
        ("42\n", "42 (int)"),
        ("hello\n", "'hello' (str)"),
    ],
    ids=["list", "int", "str"],
)
def test_recipe_not_a_mapping(tmp_path, text, value):
    path = write(tmp_path, text)
    err = load_error(path)
    msg = str(err)
    assert msg.startswith(f"{path}: <root>: got {value}"), msg
    assert "a recipe is a mapping of sections" in msg
    assert_clean(err)


def test_mapping_recipe_errors_say_recipe():
    msg = str(load_error({"runtime": {"max_seq_len": "big"}}))
    assert msg == "<recipe>: runtime.max_seq_len: got 'big' (str); expected an integer"


# --- YAML scalars --------------------------------------------------------------------------------


def test_on_off_are_strings_not_booleans(tmp_path):
    # YAML 1.1 reads bare on/off/yes/no as booleans; a recipe means the Literal strings.
    assert load_recipe(write(tmp_path, "runtime: {graphs: off}\n")).runtime.graphs == "off"
    assert load_recipe(write(tmp_path, "runtime: {graphs: on}\n")).runtime.graphs == "on"
    msg = str(load_error(write(tmp_path, "debug: {strict: yes}\n")))
    assert "debug.strict: got 'yes' (str); expected a boolean" in msg


# --- overrides -----------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> Path:
    return write(tmp_path, GOOD)


def test_override_sets_value(good):
    r = load_recipe(good, overrides=["runtime.max_seq_len=1024"])
    assert r.runtime.max_seq_len == 1024
    assert r.source_file == str(good)
    assert load_recipe(good).runtime.max_seq_len == 256  # the file is untouched


def test_overrides_apply_in_order_and_parse_yaml_values(good):
    r = load_recipe(
        good,
        [
            "runtime.max_seq_len=512",
            "runtime.max_seq_len=1024",
            "runtime.batch_buckets=[1, 8]",
            "runtime.threads=4",
            "runtime.graphs=off",
            "debug.strict=false",
            "model.source=tiny:a=b",
            "lowering.options.max_autotune=true",
        ],
    )
    assert r.runtime.max_seq_len == 1024
    assert r.runtime.batch_buckets == (1, 8)
    assert r.runtime.threads == 4
    assert r.runtime.graphs == "off"
    assert r.debug.strict is False
    assert r.model.source == "tiny:a=b"
    assert dict(r.lowering.options) == {"max_autotune": True}


def test_override_creates_missing_section(tmp_path):
    r = load_recipe(
        write(tmp_path, "model: {source: tiny:llama}\n"), ["parallel.mode=tp", "parallel.degree=2"]
    )
    assert (r.parallel.mode, r.parallel.degree) == ("tp", 2)


def test_override_is_validated(good):
    err = load_error(good, ["runtime.max_seq_len=big"])
    assert str(err) == f"{good}: runtime.max_seq_len: got 'big' (str); expected an integer"
    assert_clean(err)
    msg = str(load_error(good, ["runtime.max_seq_len=32"]))  # cross-field: prefill 64 > 32
    assert msg.startswith(f"{good}: runtime.prefill_buckets: got [16, 64]")


def test_override_unknown_pass_option_by_name(good):
    err = load_error(good, ["passes.canonicalize_attention.bogus=1"])
    msg = str(err)
    assert msg.startswith(f"{good}: passes[0].bogus: unknown key 'bogus'"), msg
    assert_clean(err)


def test_override_unknown_pass_option_by_index(good):
    msg = str(load_error(good, ["passes.1.bogus=1"]))
    assert msg.startswith(f"{good}: passes[1].bogus: unknown key 'bogus'"), msg


def test_override_string_form_pass(tmp_path):
    path = write(tmp_path, "passes: [canonicalize_attention, fuse_projections]\n")
    msg = str(load_error(path, ["passes.fuse_projections.bogus=1"]))
    assert msg.startswith(f"{path}: passes[1].bogus: unknown key 'bogus'"), msg


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("passes.7.bogus=1", ["override passes.7.bogus", "no pass at index 7", "has 2"]),
        (
            "passes.tree_attention.x=1",
            ["pass 'tree_attention' is not in the recipe", "canonicalize_attention"],
        ),
        ("passes.canonicalize_attention=1", ["override passes.canonicalize_attention", "not a whole pass"]),
        ("model.dtype.bits=16", ["override model.dtype.bits", "'model.dtype' is not a mapping"]),
        ("runtime.max_seq_len", ["override 'runtime.max_seq_len'", "expected KEY.PATH=VALUE"]),
        ("=3", ["override '=3'", "empty key path"]),
        ("runtime..threads=3", ["override 'runtime..threads=3'", "empty key path"]),
    ],
    ids=[
        "pass-index-out-of-range",
        "pass-not-in-recipe",
        "whole-pass",
        "through-scalar",
        "no-equals",
        "empty-key",
        "empty-part",
    ],
)
def test_bad_override(good, override, fragments):
    err = load_error(good, [override])
    msg = str(err)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert_clean(err)


def test_override_unknown_section(good):
    err = load_error(good, ["serving.port=8000"])
    msg = str(err)
    assert msg.startswith(f"{good}: serving: unknown key 'serving'"), msg
    assert_clean(err)


def test_override_unknown_nested_key(good):
    msg = str(load_error(good, ["runtime.max_seq=1"]))
    assert msg.startswith(f"{good}: runtime.max_seq: unknown key 'max_seq'; did you mean 'max_seq_len'?"), msg


def test_dict_overrides(good):
    r = load_recipe(good, {"lowering.backend": "aot_eager", "runtime.batch_buckets": [2, 4]})
    assert r.lowering.backend == "aot_eager"
    assert r.runtime.batch_buckets == (2, 4)
    r = load_recipe(good, {"lowering.backend": "inductor"})
    assert r.lowering.backend == "inductor"
    msg = str(load_error(good, {"lowering.backend": "tvm"}))
    assert msg.startswith(f"{good}: lowering.backend: got 'tvm' (str); allowed: ")


def test_overrides_on_mapping_do_not_mutate_it():
    raw = {"runtime": {"max_seq_len": 256, "prefill_buckets": [16]}, "passes": ["canonicalize_attention"]}
    before = yaml.safe_dump(raw)
    r = load_recipe(raw, ["runtime.max_seq_len=512", "runtime.prefill_buckets=[16, 32]"])
    assert r.runtime.max_seq_len == 512 and r.runtime.prefill_buckets == (16, 32)
    assert yaml.safe_dump(raw) == before


def test_overrides_on_recipe_object(good):
    base = load_recipe(good)
    assert load_recipe(base) is base
    assert load_recipe(base, []) is base
    r = load_recipe(base, ["runtime.max_seq_len=1024"])
    assert r.runtime.max_seq_len == 1024
    assert r.source_file == base.source_file
    assert base.runtime.max_seq_len == 256  # frozen; not changed in place
    msg = str(load_error(base, ["runtime.threads=-1"]))
    assert msg.startswith(f"{good}: runtime.threads: got -1")


# --- hash and round trip -------------------------------------------------------------------------


def test_hash_stable_across_loads(good):
    h = load_recipe(good).compute_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert load_recipe(good).compute_hash() == h
    assert load_recipe(str(good)).compute_hash() == h


def test_hash_ignores_key_order_layout_and_file(tmp_path, good):
    data = yaml.safe_load(GOOD)
    reordered = {k: dict(reversed(list(v.items()))) if isinstance(v, dict) else v for k, v in data.items()}
    reordered = dict(reversed(list(reordered.items())))
    other = write(
        tmp_path,
        "# comment\n" + yaml.safe_dump(reordered, sort_keys=False, default_flow_style=True),
        "b.yaml",
    )
    assert list(yaml.safe_load(other.read_text())) != list(data)  # really reordered
    assert load_recipe(other).compute_hash() == load_recipe(good).compute_hash()
    assert load_recipe(data).compute_hash() == load_recipe(good).compute_hash()  # source_file not hashed


def test_hash_of_explicit_defaults_equals_omitted(tmp_path):
    explicit = write(tmp_path, (RECIPES_DIR / "smollm2-135m.yaml").read_text(), "explicit.yaml")
    sparse = write(
        tmp_path,
        "passes: [canonicalize_attention, fuse_projections, {name: tuned_gemm, min_m: 3}, small_gemm]\n"
        "runtime: {prefill: dynamic}\n",
        "sparse.yaml",
    )
    assert load_recipe(explicit) == load_recipe(sparse)
    assert load_recipe(explicit).compute_hash() == load_recipe(sparse).compute_hash()


@pytest.mark.parametrize(
    "override",
    [
        "runtime.max_seq_len=1024",
        "model.dtype=bfloat16",
        "lowering.backend=inductor",
        "lowering.options.max_autotune=true",
        "runtime.graphs=off",
        "debug.strict=false",
        "runtime.threads=2",
    ],
)
def test_hash_changes_with_value(good, override):
    assert load_recipe(good, [override]).compute_hash() != load_recipe(good).compute_hash()


def test_graph_hash_ignores_only_keys_no_graph_depends_on(good):
    """A new prefix-cache size or step-cache switch keeps the saved and cached graphs; the full hash
    (reports) still tells the recipes apart, and a graph-relevant key changes both."""
    base = load_recipe(good)
    for override in ("runtime.prefix_cache_mb=0", "runtime.step_cache=false", "speculative.num_tokens=2"):
        other = load_recipe(good, [override])
        assert other.graph_hash() == base.graph_hash() and other.compute_hash() != base.compute_hash()
    for override in ("runtime.max_seq_len=1024", "debug.dump_dir=/tmp/zy-dumps", "speculative.method=ngram"):
        assert load_recipe(good, [override]).graph_hash() != base.graph_hash()


def test_hash_depends_on_pass_order(tmp_path):
    a = load_recipe(write(tmp_path, "passes: [canonicalize_attention, fuse_projections]\n", "a.yaml"))
    b = load_recipe(write(tmp_path, "passes: [fuse_projections, canonicalize_attention]\n", "b.yaml"))
    assert a != b
    assert a.compute_hash() != b.compute_hash()


ROUND_TRIP = [
    *[pytest.param(p.read_text(), id=p.stem) for p in SHIPPED],
    pytest.param(GOOD, id="good"),
    pytest.param(
        "parallel: {mode: tp, degree: 4}\n"
        "passes: [fuse_projections]\n"
        "lowering: {backend: inductor, mode: max-autotune, options: {max_autotune: true, coordinate_descent_tuning: false}}\n"
        "runtime: {max_seq_len: 4096, batch_buckets: [1], prefill_buckets: [128, 4096], graphs: off, threads: 3}\n"
        "debug: {dump_dir: /tmp/zy dumps, strict: true}\n",
        id="everything-set",
    ),
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_to_yaml_round_trip(tmp_path, text):
    original = load_recipe(write(tmp_path, text, "a.yaml"))
    dumped = original.to_yaml()
    again = load_recipe(write(tmp_path, dumped, "b.yaml"))
    assert again == original
    assert again.compute_hash() == original.compute_hash()
    assert again.to_yaml() == dumped
    assert from_dict(yaml.safe_load(dumped)) == original


# --- shipped recipes -----------------------------------------------------------------------------


def test_there_are_shipped_recipes():
    assert {p.stem for p in SHIPPED} >= {"smollm2-135m", "llama-tiny"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.source_file == str(path)
    assert r.validate() is r
    assert all(p.name in PASS_REGISTRY for p in r.passes)
    by_name = load_recipe(path.stem)
    assert by_name == r
    assert by_name.compute_hash() == r.compute_hash()


def test_default_recipe_is_smollm2():
    assert load_recipe().source_file == str(RECIPES_DIR / "smollm2-135m.yaml")
    assert zycompile.load_recipe(None) == load_recipe("smollm2-135m")


# --- clean errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        ("runtime: {max_seq_len: true}\n", None),
        ("passes: [{name: nope}]\n", None),
        ("parallel: {mode: tp}\n", None),
        ("lowering: {options: {not_an_inductor_option: 1}}\n", None),
        ("model: [x\n", None),
        ("runtime: {graphs: sometimes}\n", None),
        ("", ["runtime.threads=many"]),
        ("", ["passes.0.x=1"]),
        ("", ["runtime"]),
    ],
)
def test_errors_are_single_clean_recipe_errors(tmp_path, recipe, overrides):
    err = load_error(write(tmp_path, recipe), overrides)
    assert_clean(err)
