"""How a model computes while it trains: the weights' dtype, fp32 where precision matters, faster kernels
that give the same numbers, fp16's loss scaling, and the device."""

import torch

from bitfit.core.step import AUTOCAST_DTYPES, NO_LOSS_SCALING
from bitfit.errors import InputError

# Where configs keep the attention-probability dropout: GPT-2; BLOOM, OPT, GPT-NeoX, LLaMA, Qwen2.
ATTENTION_DROPOUT_NAMES = ("attn_pdrop", "attention_dropout")


def weights_dtype(config) -> torch.dtype:
    """The dtype the model's weights are loaded in, for a run's mode and --dtype.

    BitFit never updates its weights, so with bf16/fp16 they are stored in that half
    precision: half the memory, and the autocast forward uses them as they are. The biases
    are kept in fp32 (see bitfit.training.setup.set_precision_and_kernels), since an update of 1e-5 to a bias
    of 0.5 would vanish in bf16, whose 8-bit mantissa resolves only ~0.4% steps. Full
    fine-tuning updates every weight, so it keeps them all in fp32 and only computes in half
    precision under autocast (classic mixed precision).
    """
    if config.mode == "bitfit" and AUTOCAST_DTYPES[config.dtype] is not None:
        return AUTOCAST_DTYPES[config.dtype]
    return torch.float32


def keep_norms_in_fp32(model: torch.nn.Module) -> None:
    """Give normalisation layers fp32 parameters and fp32 inputs in a half-precision model.

    Norms divide by a variance computed over thousands of values, which half precision does
    badly; their parameters are a few thousand numbers, so fp32 costs nothing. (CUDA autocast
    upcasts them itself; CPU autocast does not, and would meet bf16 weights beside fp32 biases.)
    """
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.float()
            module.register_forward_pre_hook(_floating_inputs_to_fp32)


def _floating_inputs_to_fp32(module, args):
    return tuple(arg.float() if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args)


def fuse_tanh_gelu(model: torch.nn.Module) -> int:
    """Swap Python-written tanh-GELU modules for PyTorch's fused kernel of the same formula.

    GPT-2's "gelu_new" and BLOOM's gelu spell 0.5x(1 + tanh(0.798(x + 0.0447x^3))) out as eight
    or so tensor operations, each of which reads and writes the whole MLP activation (4x the
    hidden size), in the forward pass and again in the backward. F.gelu(approximate="tanh")
    does it in one pass; the outputs agree to float rounding. In BitFit, where no weight
    gradient is computed, these element-wise passes are a large share of each step: on the
    built-in model on CPU the swap makes a step about 8% faster. Returns how many were swapped.
    """
    from transformers.activations import FastGELUActivation, NewGELUActivation
    from transformers.models.bloom.modeling_bloom import BloomGelu

    unfused = (NewGELUActivation, FastGELUActivation, BloomGelu)
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, unfused):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def prefer_eager_attention_on_cpu(model: torch.nn.Module, device: torch.device) -> bool:
    """Train with the eager attention where PyTorch's fused one would fall back to a slower path.

    On CPU, scaled_dot_product_attention has no fused kernel with dropout: when attention
    dropout is on, it runs an unfused "math" path that does what the eager implementation does
    plus extra passes (a softmax that guards fully masked rows, q and k scaled separately).
    Training the built-in model on CPU is then about 6% faster with eager attention. On GPUs,
    and without dropout, the fused kernels are faster and stay. Returns whether it switched.
    """
    config = model.config
    dropout = max(getattr(config, name, 0.0) or 0.0 for name in ATTENTION_DROPOUT_NAMES)
    if device.type != "cpu" or dropout == 0 or config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation("eager")
    return True


def loss_scaling(dtype: str, device: torch.device):
    """What train_step scales the loss with: fp16's GradScaler (fp16 can underflow small gradients to
    zero, so the loss is scaled up before backward and the gradients down before the step), else nothing."""
    if dtype == "fp16":
        return torch.amp.GradScaler(device.type)
    return NO_LOSS_SCALING


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(choice)
