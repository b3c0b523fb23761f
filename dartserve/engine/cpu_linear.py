"""The language model's linear layers on the CPU, run by oneDNN's matmul instead of MKL's.

``nn.Linear`` on the CPU calls MKL's sgemm, which runs the few rows of a decode step (one per
running request) far below its rate. oneDNN's matmul does not: on the development machine's AMD
EPYC (2 vCPUs, AVX2), for a width-1024 model, an MLP projection at 16 rows takes 0.6-0.9 ms
against MKL's 1.1-2.0, the LM head (32064 words) 10 against 27 ms at 16 rows and 5.4 against 6.4
at one; with a prefill's hundreds of rows the two are within 15%. The op is the one torch's own
compiler emits for CPU linears (``mkldnn._linear_pointwise``); it takes the weight as loaded,
so nothing is copied and tied weights stay tied. It has no backward: the core only infers.
"""

from __future__ import annotations

import torch


class OneDnnLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def onednn_linears(model: torch.nn.Module) -> None:
    """Runs every float32 ``nn.Linear`` of ``model`` on the CPU with oneDNN, in place."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = OneDnnLinear
