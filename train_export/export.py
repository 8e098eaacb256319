"""A torch module as serving graphs, whatever the task: ONNX (torch.export with a dynamic batch
axis) and TorchScript. The module takes uint8 pixels (N, H, W, C) as `pixels`; its outputs are
named by the caller (train_export/classification.py for a classifier)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import onnx
import torch
from torch import nn

from .graph import INPUT_NAME

MAX_BATCH = 4096

# torch.jit.trace and torch.jit.load carry no annotations; these are the signatures used here.
TraceFunction = Callable[..., torch.jit.ScriptModule]
LoadFunction = Callable[[str], torch.jit.ScriptModule]


def torch_graph(module: nn.Module, example: torch.Tensor,
                output_names: Sequence[str]) -> onnx.ModelProto:
    """Export `module` to ONNX with a dynamic batch axis; store.export_and_store saves and checks
    it.

    Args:
        module: the serving module, in eval mode: uint8 pixels (N, H, W, C) in.
        example: uint8 pixels (N, H, W, C), N >= 2, used to trace the graph.
        output_names: the names of the module's outputs, in order.

    Returns:
        The graph, in memory.
    """
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about the opset conversion
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_shapes=({0: batch},),  # by position: any name for forward's argument
            verbose=False,
        )
    assert program is not None  # None only for the legacy exporter (dynamo=False)
    return program.model_proto


def export_torchscript(module: nn.Module, example: torch.Tensor, output_file: Path) -> Path:
    """TorchScript of the same module (traced), for runtimes that take TorchScript."""
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is still what
        # TorchServe-style runtimes load; the parity check proves it round-trips.
        warnings.simplefilter("ignore")
        traced = cast(TraceFunction, torch.jit.trace)(module, example, check_trace=False)
        traced.save(str(output_file))
    return Path(output_file)


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation, as above
        return cast(LoadFunction, torch.jit.load)(str(path))
