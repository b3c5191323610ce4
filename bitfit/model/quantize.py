"""--quantize nf4: the frozen weights of the transformer blocks held in 4 bits, as in QLoRA.

BitFit is the best case for a 4-bit base: nothing quantized is ever trained, and a bias lives
outside its weight matrix, so it stays a full-precision parameter for free. Every Linear layer
but the output head (GPT-2's Conv1D layers too) keeps its weight as NF4: 4-bit NormalFloat
codes, one absmax scale per 64 weights, the scales themselves stored in 8 bits (QLoRA's
"double quantization"), about 4.13 bits a weight in all. The storage and the matmul are
torchao's (NF4Tensor): the weight is dequantized on the fly for the forward pass and again for
the backward pass, which needs only the gradient for the layer's input. Embeddings, norms and
the output head keep --dtype.

torchao is imported only when a quantized model is built (import_to_nf4).
"""

import math

import torch
import torch.nn.functional as F

from bitfit.errors import TORCHAO_IMPORT_NOISE, InputError, library_logs_silenced
from bitfit.model.fingerprint import fingerprint_sample

NF4_BLOCK = 64  # weights that share one absmax scale (QLoRA's block size)
NF4_SCALE_GROUP = 256  # at most this many block scales share one second-level constant (QLoRA's)
# torchao dequantizes a weight with ~14 bytes of temporaries per weight (int64 codes among them):
# 0.9 GiB for a moment for a 7B model's 68M-weight MLP matrix. Dequantized in pieces of at most
# this many weights, it stays under ~112 MiB whatever the model.
DEQUANTIZE_PIECE = 2**23


class NF4Linear(torch.nn.Linear):
    """A Linear layer whose frozen weight is a torchao NF4Tensor and whose bias is an ordinary
    parameter (fp32 while it trains, like every bias in BitFit).

    It keeps its place and its parameter names (`...c_attn.weight`, `...c_attn.bias`), so a
    delta trained on the 4-bit base names the same tensors as one trained on the plain base.
    unquantized_sample is what the base fingerprint reads from the weight it replaced
    (bitfit.model.fingerprint.base_fingerprint): the 4-bit values are no longer the base's.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.nn.Parameter | None, unquantized_sample):
        # The meta device: nn.Linear allocates no weight of its own, which the NF4 one replaces.
        super().__init__(weight.size(1), weight.size(0), bias=False, device="meta")
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.unquantized_sample = unquantized_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # As autocast casts a plain Linear's input, and so that the weight is dequantized
            # straight into the compute dtype rather than into fp32 first.
            x = x.to(torch.get_autocast_dtype(device_type))
        # torchao's linear for NF4: dequantize, matmul; its backward dequantizes again and returns
        # only the input's gradient (the weight never trains). It saves no activation. A large
        # weight goes a block of rows at a time, each a view of the 4-bit storage.
        rows = piece_rows(self.weight)
        pieces = [self.weight] if rows == self.out_features else self.weight.split(rows)
        outs = [F.linear(x, piece) for piece in pieces]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        # The bias joins in the output's dtype, as in a plain Linear under autocast.
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight=NF4"


def quantize_frozen_weights(model: torch.nn.Module, device: torch.device, keep_on: torch.device | None = None
                            ) -> list[str]:
    """Store the weight of every Linear layer but the output head as NF4, frozen, on device
    (or quantized on device and kept on keep_on: --fsdp keeps them on the CPU until each rank
    takes its shards, so that no GPU holds the whole 4-bit model).

    Layer by layer: each weight moves to device, is quantized there, and its full-precision copy
    is let go, so the device never holds more than one unquantized weight (a 7B model in bf16
    would not fit where its 4-bit copy does). GPT-2's Conv1D, which computes x @ W + b, becomes a
    Linear with the transposed weight. Returns the names of the weights left unquantized:
    those whose size is not a multiple of the 64-weight block (none in real models).
    """
    from transformers.pytorch_utils import Conv1D

    to_nf4 = import_to_nf4()
    head = model.get_output_embeddings()
    paths = [path for path, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and not isinstance(module, NF4Linear)
             and module is not head]
    left_as_they_were = []
    for path in paths:  # looked up one at a time, so that each replaced layer's weight is freed
        module = model.get_submodule(path)
        weight = module.weight.detach()
        if weight.numel() % NF4_BLOCK:
            left_as_they_were.append(f"{path}.weight")
            continue
        sample = fingerprint_sample(weight)  # before quantizing: the base's own values
        weight = weight.to(device)
        if isinstance(module, Conv1D):
            weight = weight.t()
        blocks = weight.numel() // NF4_BLOCK
        nf4 = to_nf4(weight.contiguous(), NF4_BLOCK, scale_group(blocks))
        if keep_on is not None:
            nf4 = nf4.to(keep_on)  # no dtype given: torchao moves the 4-bit storage as it is
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, NF4Linear(nf4, module.bias, sample))
    return left_as_they_were


def piece_rows(weight) -> int:
    """Rows of an NF4 weight to dequantize at once: the fewest equal pieces of at most
    DEQUANTIZE_PIECE weights that split its rows, its bytes and its groups of scales evenly
    (torchao's split needs that); the whole weight where no such split exists."""
    rows, groups = weight.size(0), weight.quantization_factor.numel()
    for pieces in range(math.ceil(weight.numel() / DEQUANTIZE_PIECE), groups + 1):
        if rows % pieces == 0 and groups % pieces == 0 and weight.quantized_data.numel() % pieces == 0:
            return rows // pieces
    return rows


def scale_group(blocks: int) -> int:
    """How many block scales share one second-level constant: QLoRA's 256 where the blocks divide
    into groups of 256, else the largest group size up to 256 that divides them evenly (torchao
    needs whole groups). SmolLM2's 576 x 576 projections have 5184 blocks, for instance: 216."""
    return max(size for size in range(1, min(blocks, NF4_SCALE_GROUP) + 1) if blocks % size == 0)


def splits_evenly(weight, ranks: int) -> bool:
    """Whether FSDP can give each of `ranks` ranks an equal shard of a 4-bit weight.

    torchao's NF4Tensor shards by rows, without padding: each shard must hold whole rows, whole
    64-weight blocks and whole groups of block scales, so that it dequantizes to its rows exactly
    as the whole weight does. That holds when the rows and the groups of scales divide by
    `ranks` (the blocks and the 4-bit codes then do too). The groups are what the shape decides
    (scale_group): QLoRA's 256 blocks in real models, whose layers split over 2, 4 or 8 ranks.
    """
    return weight.size(0) % ranks == 0 and weight.quantization_factor.numel() % ranks == 0


def describe_quantized(model: torch.nn.Module) -> str:
    """One line: how many weights are held in 4 bits, and any left as they were."""
    from transformers.pytorch_utils import Conv1D

    quantized = sum(isinstance(module, NF4Linear) for module in model.modules())
    head = model.get_output_embeddings()
    left = [f"{path}.weight" for path, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and not isinstance(module, NF4Linear)
            and module is not head]
    line = f"nf4: {quantized} weights held in 4 bits (every Linear layer but the output head)"
    if left:
        line += (f"; {len(left)} left as they were, their size not a multiple of {NF4_BLOCK}: "
                 f"{', '.join(left[:3])}{', ...' if len(left) > 3 else ''}")
    return line


def import_to_nf4():
    """torchao's to_nf4, imported on first use with its import-time log lines kept off the screen."""
    try:
        with library_logs_silenced(TORCHAO_IMPORT_NOISE):
            from torchao.quantization import to_nf4
    except ImportError:
        raise InputError("--quantize nf4 needs torchao 0.18 or later (pip install 'torchao>=0.18')") from None
    return to_nf4
