"""Export round trip on CPU: AOTInductor package + safetensors + manifest, loaded in a fresh process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import zycompile
from zycompile.export import PackageError, read_manifest

PROMPTS = [[5, 17, 33, 2, 9], [7, 8], list(range(40, 75))]
FAST = [
    "lowering.backend=aot_eager",  # the package is built by AOTInductor whatever the live lowering
    "runtime.max_seq_len=96",
    "runtime.prefill_buckets=[8, 32]",
    "runtime.batch_buckets=[1, 2]",
    # K-major weights (the LM head) and q/k/v views into one fused buffer: the package must rebuild those
    # exact views; small_gemm rewrites the row-major decode GEMVs (the K-major head keeps its GEMM);
    # overlap_comm, a post-grad pass (nothing to match on one device), must report from inside AOTI
    "passes=[canonicalize_attention, {name: weight_layout, min_out_features: 256}, fuse_projections, "
    "small_gemm, overlap_comm]",
]
FRESH = """
import json, re, sys
import zycompile
m = zycompile.load(sys.argv[1])
out = m.generate(json.loads(sys.argv[2]), max_new_tokens=10, ignore_eos=True)
print(json.dumps({"tokens": out.tokens, "modeling": sorted(x for x in sys.modules if re.match(r"transformers\\.models\\.(?!auto\\.)\\w+\\.modeling_", x))}))
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch._dynamo.reset()
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    want = opt.generate(PROMPTS, max_new_tokens=10, ignore_eos=True).tokens
    out = tmp_path_factory.mktemp("pkg") / "tiny"
    opt.export(out)
    return out, want


def test_round_trip_in_a_fresh_process_without_model_code(package):
    pkg, want = package
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(pkg), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"] == want
    assert got["modeling"] == []  # no transformers model class was imported


def test_layout_and_manifest(package):
    pkg, _ = package
    m = read_manifest(pkg)
    assert set(m["graphs"]) == {"decode_b1", "decode_b2", "prefill"}
    assert {"weights.safetensors", "recipe.yaml", "decode_b1.pt2", "prefill.pt2"} <= set(m["files"])
    assert m["torch"] == torch.__version__ and m["device"]["type"] == "cpu"
    # each storage saved once (the fused q/k/v buffer, not its views), with every view's layout
    assert any(v["stride"][0] == 1 and len(v["stride"]) == 2 for v in m["weights"].values())  # K-major
    assert len({v["storage"] for v in m["weights"].values()}) < len(m["weights"])
    # weights live once, beside the graphs: no .pt2 carries a copy of them
    weights = m["bytes"]["weights.safetensors"]
    assert all(m["bytes"][g["file"]] < weights + 2_500_000 for g in m["graphs"].values())


def test_manifest_lists_the_recipe_passes_applied(package):
    pkg, _ = package
    m = read_manifest(pkg)
    got = {(r["graph"], r["name"]): r["matches"] for r in m["passes"]}
    for graph in ("decode_b1", "decode_b2", "prefill"):
        assert got[(graph, "canonicalize_attention")] == 2  # one attention per layer
        assert got[(graph, "fuse_projections")] == 4  # q/k/v and gate/up per layer
        assert got[(graph, "weight_layout")] == 1  # the K-major LM head reached the graph
    # every linear but the K-major head, per decode graph; the dynamic-length prefill keeps its GEMMs
    assert got[("decode_b1", "small_gemm")] == got[("decode_b2", "small_gemm")] == 8
    assert got[("prefill", "small_gemm")] == 0
    post = [r for r in m["passes"] if r["stage"] == "post_grad"]
    assert {r["graph"] for r in post} == {"decode_b1", "decode_b2", "prefill"}  # the hook ran in AOTI
    assert all(r["name"] == "overlap_comm" for r in post)
    head = next(r for r in m["passes"] if r["graph"] == "decode_b1" and r["name"] == "small_gemm")
    assert any("K-major" in n for n in head["notes"])
    assert m["pass_warnings"] == []
    # the graphs read the fused buffers (views of the q/k/v storage), not the separate weights
    assert any(n.startswith("_zy_fused_") for n in m["weights"])


def _copy(package, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(package[0], dst)
    return dst


def test_tampered_weights_rejected(package, tmp_path):
    pkg = _copy(package, tmp_path)
    data = bytearray((pkg / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (pkg / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"weights.safetensors: sha256 differs"):
        zycompile.load(pkg)


def test_missing_graph_rejected(package, tmp_path):
    pkg = _copy(package, tmp_path)
    (pkg / "decode_b2.pt2").unlink()
    with pytest.raises(PackageError, match=r"decode_b2.pt2: missing"):
        zycompile.load(pkg)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("torch", "2.0.0", "built with torch 2.0.0"),
        ("device", {"type": "cuda", "name": "NVIDIA H100"}, "built for cuda"),
    ],
)
def test_other_torch_or_device_rejected(package, tmp_path, field, value, message):
    pkg = _copy(package, tmp_path)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest[field] = value
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message):
        zycompile.load(pkg)


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="manifest.json: missing"):
        zycompile.load(tmp_path)
