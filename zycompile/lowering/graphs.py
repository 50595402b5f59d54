"""CUDA/HIP graphs for the decode step, one per batch bucket (``runtime.graphs: auto | on | off``).

The runtime already gives each batch bucket its own static-shape decode graph over a static-address
KV cache, so graph capture is Inductor's cudagraph trees: every static-shape graph is captured on
first replay-eligible call and replayed after, inputs copied into its static buffers. Dynamic-shape
graphs (the dynamic-length prefill) are left uncaptured. torch.cuda drives ROCm's HIP graphs too.
On CPU there is nothing to capture: a no-op that says so.
"""

from __future__ import annotations

from typing import Any

import torch


def graph_patches(graphs: str, backend: str, device_type: str) -> tuple[dict[str, Any], str | None]:
    """Inductor config for ``runtime.graphs`` on ``device_type``, and a note when it does nothing."""
    if graphs == "off":
        return ({"triton.cudagraphs": False} if backend == "inductor" else {}), None
    if device_type != "cuda":
        note = f"runtime.graphs '{graphs}': CUDA/HIP graphs need a GPU; on {device_type} the steps run without them"
        return {}, (note if graphs == "on" or device_type != "cpu" else None)
    if backend != "inductor":
        return (
            {},
            f"runtime.graphs '{graphs}': graph capture comes with lowering.backend 'inductor' (got '{backend}')",
        )
    return {"triton.cudagraphs": True, "triton.cudagraph_skip_dynamic_graphs": True}, None


def device_of(example_inputs: list) -> str:
    return next((t.device.type for t in example_inputs if isinstance(t, torch.Tensor)), "cpu")
