"""Quantization attacks (Zhang et al., ICLR 2025, "Catastrophic failure of LLM unlearning via
quantization"): the linear layers' weights are quantized with bitsandbytes, the library of the published
attack, and the model is scored again. bitsandbytes runs the same schemes on CUDA and on CPU (its CPU
backend), so a CPU result is the scheme a GPU result is. ``lm_head`` stays in full precision, as
transformers' ``BitsAndBytesConfig`` leaves it.

- ``quant8``: LLM.int8 (``Linear8bitLt``): int8 weights with one absmax scale per output row; activation
  columns above ``threshold`` (transformers' default 6.0) stay in 16-bit.
- ``quant4``: 4-bit weights (``Linear4bit``), NF4 by default (``quant_type: fp4`` for FP4), one absmax
  scale per block of ``block_size`` weights; the matmul runs in the model's dtype on dequantized weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

from harness import HarnessError, hookimpl
from harness.attacks import Attack, Attacked, AttackInput, copy_model

SKIP = ("lm_head",)
CPU_PACK_ROWS = 32  # bitsandbytes' CPU-packed 4-bit kernel takes weights of a multiple of 32 output rows
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit quantizer takes


def _bnb():
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)  # its CPU backend logs a missing optional kernel package at import
    try:
        import bitsandbytes
    except ImportError:
        raise HarnessError("the quantization attacks need bitsandbytes: pip install bitsandbytes") from None
    finally:
        log.setLevel(level)
    return bitsandbytes


def quantize_linear(model, bits: int, *, quant_type: str = "nf4", block_size: int = 64, threshold: float = 6.0):
    """A copy of ``model`` whose ``nn.Linear`` layers (all but ``lm_head``) hold bitsandbytes weights.
    Returns (copy, number of layers quantized, the library's version, layers left unquantized)."""
    import torch

    bnb = _bnb()
    q = copy_model(model)
    first = next(q.parameters())
    device, dtype = first.device, first.dtype
    count, kept = 0, []
    for pname, parent in list(q.named_modules()):
        for cname, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or cname in SKIP:
                continue
            if bits == 4 and child.in_features % block_size:
                # bitsandbytes' 4-bit blocks run along the input dimension; such a layer stays unquantized
                kept.append(f"{pname}.{cname}" if pname else cname)
                continue
            w = child.weight.data.detach().to("cpu")  # bitsandbytes quantizes when the weight moves to its device
            bias = child.bias is not None
            if bits == 8:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias, has_fp16_weights=False,
                                          threshold=threshold)
                new.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias, compute_dtype=dtype,
                                        quant_type=quant_type, compress_statistics=False)
                new.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant_type,
                                               blocksize=block_size, compress_statistics=False)
                if child.out_features % CPU_PACK_ROWS:
                    # On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for its fast kernel at the
                    # first no-grad forward and asserts out_features % 32 == 0 (the default tiny model's MLP is
                    # 344 wide). Such a layer keeps the same NF4/FP4 weights through the generic kernel.
                    new.support_avx512bf16_for_cpu = False
            if bias:
                new.bias = torch.nn.Parameter(child.bias.data.detach().clone(), requires_grad=False)
            setattr(parent, cname, new.to(device))
            count += 1
    if not count:
        raise HarnessError("quantization attack: the model has no torch.nn.Linear layers to quantize"
                           + (f" (in_features not a multiple of {block_size}: {', '.join(kept)})" if kept else ""))
    return q.eval(), count, bnb.__version__, kept


def _scheme(library_version: str, layers: int, kept: list[str], device, **scheme) -> dict:
    return {"library": "bitsandbytes", "library_version": library_version, "device": str(device),
            "layers_quantized": layers, "skipped": [*SKIP, *kept], **scheme}


@dataclass
class Quant8(Attack):
    name: ClassVar[str] = "quant8"
    version: ClassVar[int] = 1
    description: ClassVar[str] = "8-bit LLM.int8 weights of the linear layers (bitsandbytes)"
    threshold: float = 6.0

    def check(self) -> None:
        if self.threshold < 0:
            raise HarnessError(f"attack 'quant8': threshold must be >= 0 (0: no outlier columns), got {self.threshold}")

    def apply(self, inp: AttackInput) -> Attacked:
        # logged at every forward of a float32 model; the cast to float16 is part of the LLM.int8 scheme
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        q, n, v, kept = quantize_linear(inp.model, 8, threshold=self.threshold)
        return Attacked(q, _scheme(v, n, kept, next(q.parameters()).device, bits=8, scheme="LLM.int8",
                                   group_size="row", outlier_threshold=self.threshold, weight_only=False))


@dataclass
class Quant4(Attack):
    name: ClassVar[str] = "quant4"
    version: ClassVar[int] = 1
    description: ClassVar[str] = "4-bit NF4 (or FP4) weights of the linear layers (bitsandbytes)"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    block_size: int = 64

    def check(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise HarnessError(f"attack 'quant4': quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.block_size not in BLOCK_SIZES:
            raise HarnessError(f"attack 'quant4': block_size must be one of {', '.join(map(str, BLOCK_SIZES))} "
                               f"(bitsandbytes' blocks), got {self.block_size}")

    def apply(self, inp: AttackInput) -> Attacked:
        self.check()
        q, n, v, kept = quantize_linear(inp.model, 4, quant_type=self.quant_type, block_size=self.block_size)
        return Attacked(q, _scheme(v, n, kept, next(q.parameters()).device, bits=4, scheme=self.quant_type,
                                   group_size=self.block_size, weight_only=True))


@hookimpl
def register_attacks(register):
    register(Quant8)
    register(Quant4)
