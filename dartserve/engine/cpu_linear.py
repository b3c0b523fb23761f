"""The language model's large linear layers on the CPU, run by oneDNN's matmul instead of MKL's.

``nn.Linear`` on the CPU calls MKL's sgemm, which runs the few rows of a decode step (one per
running request) far below its rate. oneDNN's matmul does not: on the development machine's AMD
EPYC (2 vCPUs, AVX2), for a width-1024 model, an MLP projection at 16 rows takes 0.6-0.9 ms
against MKL's 1.1-2.0, the LM head (32064 words) 10 against 27 ms at 16 rows and 5.4 against 6.4
at one; with a prefill's hundreds of rows the two are within 15%. oneDNN costs about 15 us more
per call, though, so a small weight stays with MKL: at 128 x 352 (the bundled demo model) a
one-row product takes 22 us against 8, and the two break even near ``ONEDNN_MIN_WEIGHT``
elements (384 x 1032 ties; 512 x 1376 is 1.2 times faster in oneDNN at 16 rows).

oneDNN reorders a plain weight into its own blocked layout on every call with more than one
row; a copy reordered once (``packed``) saves that. Reading the eight layers of the width-1024
bench model (400 MB, more than the caches hold) at 16 rows took 23 ms packed against 39 plain,
at 4 rows 14 against 27, the LM head at 16 rows 7 against 11. A single row is the exception:
oneDNN's one-row kernel reads the plain weight about 9% faster than the packed one, so a decode
step of one request keeps using it. Both copies stay, which doubles these weights' memory on the
CPU: the price of the fastest product at every batch size.

The op is the one torch's own compiler emits for CPU linears (``mkldnn._linear_pointwise``); it
takes the plain weight as loaded, so nothing of it is copied and tied weights stay tied. It has
no backward and runs float32 only, so a call that needs either goes to ``nn.Linear``'s own path.
A weight changed in place or replaced after the conversion (``load_state_dict``) is packed again
at its next product.
"""

from __future__ import annotations

import torch

ONEDNN_MIN_WEIGHT = 2**19  # weight elements (2 MiB of float32)
PACKED_FOR_ROWS = 16  # the row count oneDNN tunes its blocked layout for; 2 to 2048 rows all gain


class OneDnnLinear(torch.nn.Linear):
    packed: torch.Tensor  # the weight in oneDNN's blocked layout
    packed_from: tuple[int, int]  # the weight it was made from: its storage and version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        if not plain or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        one_row = x.numel() == x.shape[-1]
        if not one_row and self.packed_from != (self.weight.data_ptr(), self.weight._version):
            _pack(self)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight if one_row else self.packed, self.bias, "none", [], "")


def _pack(module: OneDnnLinear) -> None:
    weight = module.weight.detach()
    module.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_ROWS)
    module.packed_from = (weight.data_ptr(), module.weight._version)


def onednn_linears(model: torch.nn.Module) -> None:
    """Runs every large float32 ``nn.Linear`` of ``model`` on the CPU with oneDNN, in place."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        weight = module.weight if type(module) is torch.nn.Linear else None
        if weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHT:
            module.__class__ = OneDnnLinear
            _pack(module)
