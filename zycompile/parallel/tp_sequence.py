"""Sequence-parallel TP styles (``parallel: {mode: tp, sequence_parallel: true}``), after Megatron-SP.

Plain TP replicates the residual stream and ends each block with an all-reduce. With sequence
parallelism the residual stream and the norms are sharded on the sequence (``Shard(1)``): the block's
input is all-gathered before q/k/v (and gate/up), and o_proj (down_proj) reduce-scatters onto the
sequence instead of all-reducing. Same bytes on the wire, 1/D of the norm and residual work and
activation memory, and the collectives sit next to the GEMMs, where ``overlap_comm`` can fuse them.

A forward whose length T does not divide the degree (decode: T = 1) cannot be split on the sequence.
It runs as plain TP instead, with the same weights: the embedding and the row-wise projections pick
``Shard(1)`` when T % D == 0 and ``Replicate()`` otherwise (both see the full T), and the residual
stream stays a DTensor between modules so the norms and the gathers follow whatever layout arrived.
With bucketed prefill (buckets divisible by D) prefill is sequence-parallel and decode is plain TP.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

SEQ = Shard(1)


def _layout(seq_len, mesh) -> tuple:
    return (SEQ,) if seq_len % mesh.size() == 0 else (Replicate(),)


class SeqRowwise(RowwiseParallel):
    """Row-wise linear / vocab embedding whose partial output is reduce-scattered on the sequence
    (all-reduced when T does not divide the degree); returns a DTensor for the residual stream."""

    def __init__(self, embedding: bool = False):
        super().__init__(input_layouts=Replicate() if embedding else Shard(-1), use_local_output=False)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        return outputs.redistribute(placements=_layout(outputs.shape[1], device_mesh), async_op=True)


class SeqNorm(ParallelStyle):
    """A norm on the residual DTensor in whatever layout it has (weights replicated); with
    ``gather=True`` (the final norm) its output is made whole and local for the LM head."""

    def __init__(self, gather: bool = False):
        self.gather = gather

    @staticmethod
    def _replicate(name, module, mesh):
        for p_name, p in module.named_parameters():
            module.register_parameter(
                p_name, torch.nn.Parameter(DTensor.from_local(p, mesh, [Replicate()], run_check=False), False)
            )

    @staticmethod
    def _input(mod, inputs, mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):  # a plain tensor is the whole sequence
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return (x, *inputs[1:])

    @staticmethod
    def _output(gather, mod, outputs, mesh):
        if not gather:
            return outputs
        return outputs.redistribute(placements=[Replicate()], async_op=True).to_local()

    def _apply(self, module, device_mesh):
        return distribute_module(
            module, device_mesh, self._replicate, self._input, partial(self._output, self.gather)
        )


class GatherSequence(ParallelStyle):
    """All-gather a module's sequence-sharded input (positional 0, or keyword ``kwarg``) to a whole
    local tensor: attention and the MLP then run on all tokens with this rank's heads / columns."""

    def __init__(self, kwarg: str | None = None):
        self.kwarg = kwarg

    @staticmethod
    def _whole(x):
        if isinstance(x, DTensor):
            return x.redistribute(placements=[Replicate()], async_op=True).to_local()
        return x

    def _apply(self, module, device_mesh):
        if self.kwarg:
            kw = self.kwarg

            def hook(mod, args, kwargs):
                return args, {**kwargs, kw: self._whole(kwargs[kw])}

            module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            module.register_forward_pre_hook(lambda mod, args: (self._whole(args[0]), *args[1:]))
        return module
