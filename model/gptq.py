"""GPTQ 4-bit checkpoints as AutoGPTQ writes them (Qwen-7B-Chat-Int4), run without a full-precision copy.

On disk, per quantized projection with K input and N output features and G = K / group_size groups:
    qweight  int32 [K/8, N]  eight codes per word along the input dimension: channel 8r+j in bits 4j..4j+3 of row r
    qzeros   int32 [G, N/8]  zero points, packed the same way along the output dimension, each stored minus one
    scales   fp16  [G, N]
    g_idx    int32 [K]       the group of each input channel (act-order, desc_act, permutes them)
    bias     [N]             where the layer has one (c_attn)
so W[n, k] = scales[g, n] * (code[k, n] - (stored_zero[g, n] + 1)) with g = g_idx[k]. AutoGPTQ's
QuantLinear.pack stores `zeros - 1` and its dequantization adds the 1 back (the "gptq" checkpoint format;
"gptq_v2" stores the zero itself and is refused). Embeddings, norms and the LM head stay in floating point.

Matrix products, one function whatever the kernel that computes it. The reference dequantizes one
layer's weight inside its forward, in fp32 (exact), rounds it once to the activation dtype and multiplies
it through `kernels.matmul` (the batch-invariant Triton matmul, whose K order the fused kernel keeps) when
the model's op set is the invariant one on a GPU, else through the op set's product. On a CUDA GPU
`use_int4mm` moves layers to
- "triton" (the default): the fused kernel of gptq_triton.py, which reads the stored tensors as they are,
  dequantizes each weight tile in registers to the reference's values and accumulates over K in
  `kernels.matmul`'s order: the invariant reference's bits at every row count (prefill and decoding);
- "tinygemm" (the named fast option): PyTorch's int4 kernel (`torch._weight_int4pack_mm`), repacked into its
  own layout (the GPTQ tensors are dropped). It computes a slightly different function (bf16 scales, a
  bf16 zero, a second rounding: see `tinygemm_weight` and EVALUATION.md, "Int4").
`int4_path` names the path a model's layers take, for run.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError


def _triton_kernels():
    """model/gptq_triton.py, imported on first use (Triton is absent from CPU-only installs, and importing
    it early would fix Triton's mode before a test can choose its interpreter)."""
    try:
        from . import gptq_triton
    except ImportError:
        return None
    return gptq_triton

QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")  # in every block
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
ZERO_OFFSET = 1  # the "gptq" format stores zero - 1
INT4MM_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes tinygemm is built for
KERNELS = ("triton", "tinygemm")


class QuantizationError(ConfigError):
    """A quantize_config.json or GPTQ tensor that cannot be read correctly; the message names the file and key."""


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int
    desc_act: bool
    source: str = field(compare=False)  # the file (and block) it came from, named in errors


def read_quantize_config(ckpt: Path) -> GPTQConfig | None:
    """The checkpoint's GPTQ settings, or None for a full-precision checkpoint. AutoGPTQ's quantize_config.json,
    else the `quantization_config` block of config.json (where the Qwen-72B-Chat-Int4 release keeps them);
    both present must agree."""
    path, config_path = ckpt / "quantize_config.json", ckpt / "config.json"
    block = _json(config_path).get("quantization_config") if config_path.exists() else None
    embedded = _gptq_config(block, f"{config_path} quantization_config") if block is not None else None
    if not path.exists():
        return embedded
    own = _gptq_config(_json(path), str(path))
    if embedded is not None and own != embedded:
        raise QuantizationError(f"{path} (bits {own.bits}, group_size {own.group_size}, desc_act {own.desc_act}) "
                                f"and {embedded.source} (bits {embedded.bits}, group_size {embedded.group_size}, "
                                f"desc_act {embedded.desc_act}) disagree: keep one")
    return own


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise QuantizationError(f"{path}: not valid JSON ({err})") from None


def _gptq_config(cfg, where: str) -> GPTQConfig:
    if not isinstance(cfg, dict):
        raise QuantizationError(f"{where}: expected a JSON object, found {cfg!r}")
    if cfg.get("quant_method", "gptq") != "gptq":
        raise QuantizationError(f"{where}: quant_method {cfg['quant_method']!r} is not supported (only 'gptq')")
    for key in ("bits", "group_size", "desc_act"):
        if key not in cfg:
            raise QuantizationError(f"{where}: missing key {key!r}")
    if cfg["bits"] != 4:
        raise QuantizationError(f"{where}: bits {cfg['bits']} is not supported (only 4-bit GPTQ)")
    if not isinstance(cfg["group_size"], int) or cfg["group_size"] <= 0:
        raise QuantizationError(f"{where}: group_size {cfg['group_size']} is not supported (needs a positive group size)")
    if not isinstance(cfg["desc_act"], bool):
        raise QuantizationError(f"{where}: desc_act must be true or false, found {cfg['desc_act']!r}")
    if cfg.get("checkpoint_format", "gptq") != "gptq":  # e.g. gptq_v2, which stores the zero itself
        raise QuantizationError(f"{where}: checkpoint_format {cfg['checkpoint_format']!r} is not supported "
                                f"(only AutoGPTQ's 'gptq' layout)")
    if cfg.get("is_marlin_format"):
        raise QuantizationError(f"{where}: is_marlin_format true is not supported (only AutoGPTQ's 'gptq' layout)")
    return GPTQConfig(cfg["bits"], cfg["group_size"], cfg["desc_act"], where)


def unpack_int4(words: Tensor, dim: int) -> Tensor:
    """int32 words -> their eight 4-bit values (int32, 0..15) along `dim` (0 or 1), lowest nibble first."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    if dim == 0:  # [R, C] -> [R, 8, C] -> [8R, C]
        return ((words[:, None, :] >> shifts[:, None]) & 0xF).reshape(-1, words.shape[1])
    return ((words[:, :, None] >> shifts) & 0xF).reshape(words.shape[0], -1)  # [R, C, 8] -> [R, 8C]


def pack_int4(values: Tensor, dim: int) -> Tensor:
    """The inverse of `unpack_int4`, for writing checkpoints: 4-bit values -> int32 words, eight along `dim`."""
    if values.min() < 0 or values.max() > 15:
        raise ValueError("4-bit values must lie in 0..15")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    if dim == 0:
        words = (values.long().view(-1, 8, values.shape[1]) << shifts[:, None]).sum(1)
    else:
        words = (values.long().view(values.shape[0], -1, 8) << shifts).sum(2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, read as signed


class GPTQLinear(nn.Module):
    """y = x W^T + b with W held as GPTQ codes; `use_int4mm` moves a CUDA layer to a GPU kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, desc_act: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.desc_act = group_size, desc_act
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features)) if bias else None)
        self.kernel: str | None = None  # one of KERNELS once `use_int4mm` moved it; None: the reference

    @property
    def fused(self) -> bool:
        return self.kernel is not None

    def forward(self, x: Tensor, ops) -> Tensor:
        """ops: the model's op set (model/ops.py). The fused kernel keeps the Triton matmul's K order, so
        under the invariant set the reference multiplies through that matmul, not the op set's cuBLAS product."""
        if x.is_cuda and self.kernel == "tinygemm":
            return self._forward_int4mm(x)
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "triton" and x.dtype in (torch.bfloat16, torch.float16):
            y = _triton_kernels().gptq_matmul(rows.contiguous(), *self.gptq_tensors(), bias=self.bias)
        elif ops.name == "invariant" and x.is_cuda:
            from . import kernels  # Triton, imported on a GPU only

            y = kernels.matmul(rows, self.dequantize().to(x.dtype), self.bias)
        else:
            y = ops.linear(rows, self.dequantize().to(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def gptq_tensors(self) -> tuple:
        """The stored tensors and settings as `gptq_triton.gptq_matmul` takes them."""
        return self.qweight, self.scales, self.qzeros, self.g_idx, self.group_size, self.desc_act

    def dequantize(self) -> Tensor:
        """W [out, in] in fp32; exact, since a code difference (|d| <= 16) times an fp16 scale fits fp32."""
        codes = unpack_int4(self.qweight, dim=0)  # [in, out]
        zeros = unpack_int4(self.qzeros, dim=1) + ZERO_OFFSET  # [groups, out]
        group = self.g_idx.long()
        return ((codes - zeros[group]).float() * self.scales[group].float()).t()

    def check_groups(self, g_idx: Tensor, where: str) -> None:
        n_groups = self.in_features // self.group_size
        if g_idx.min() < 0 or g_idx.max() >= n_groups:
            raise QuantizationError(f"{where}: group index outside [0, {n_groups})")
        in_order = torch.arange(self.in_features, device=g_idx.device) // self.group_size
        if not self.desc_act and not torch.equal(g_idx.long(), in_order):  # AutoGPTQ would ignore g_idx here
            raise QuantizationError(f"{where}: groups are not in input order although desc_act is false")

    def fits(self, kernel: str) -> bool:
        if kernel == "triton":
            return self.qweight.is_cuda and _triton_kernels() is not None
        return self.fits_int4mm()

    # ---- the tinygemm GPU path (PyTorch's own int4 kernel) ------------------------------------
    def fits_int4mm(self) -> bool:
        """tinygemm needs an sm80+ GPU, one of its group sizes and groups of equal size (K, N are
        multiples of 32 and 8 already: the group size and the GPTQ packing see to that)."""
        if not self.qweight.is_cuda or torch.cuda.get_device_capability(self.qweight.device) < (8, 0):
            return False
        sizes = torch.bincount(self.g_idx.long(), minlength=self.in_features // self.group_size)
        return self.group_size in INT4MM_GROUP_SIZES and bool((sizes == self.group_size).all())

    def repack_for_int4mm(self) -> None:
        """Switch to the fused kernel's layout and drop the GPTQ tensors (one 4-bit copy on the device)."""
        codes, scale_zero, order = int4mm_operands(self)
        inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
        packed = torch._convert_weight_to_int4pack(pack_nibble_pairs(codes), inner_k_tiles)
        for name in GPTQ_TENSORS:
            delattr(self, name)
        self.register_buffer("int4_weight", packed)
        self.register_buffer("int4_scale_zero", scale_zero.to(torch.bfloat16))
        self.register_buffer("input_order", order)
        self.kernel = "tinygemm"

    def _forward_int4mm(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.input_order is not None:
            rows = rows[:, self.input_order]
        y = torch._weight_int4pack_mm(rows.to(torch.bfloat16).contiguous(), self.int4_weight, self.group_size,
                                      self.int4_scale_zero)  # the CUDA kernel takes bf16 only
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def int4mm_operands(layer: GPTQLinear) -> tuple[Tensor, Tensor, Tensor | None]:
    """The layer in tinygemm's terms: codes [N, K], scale-and-zero [G, N, 2] fp32, input order.

    The kernel reads W[n, k] = (code - 8) * scale + zero over groups of consecutive k, so GPTQ's
    (code - z) * scale becomes zero = (8 - z) * scale, computed exactly in fp32 from the fp16 scale.
    (Folding the bf16-rounded scale instead would multiply the scale's rounding by |code - z| <= 15
    rather than |code - 8| <= 8.) Act-order layers get their input channels sorted by group; the input
    is permuted the same way (`order`, None when already in order).
    """
    codes = unpack_int4(layer.qweight, dim=0)  # [K, N]
    zeros = unpack_int4(layer.qzeros, dim=1) + ZERO_OFFSET  # [G, N]
    scales = layer.scales.float()
    order = torch.argsort(layer.g_idx.long(), stable=True)
    if torch.equal(order, torch.arange(layer.in_features, device=order.device)):
        order = None
    else:
        codes = codes[order]
    scale_zero = torch.stack([scales, (8 - zeros).float() * scales], dim=-1)
    return codes.t().contiguous(), scale_zero, order


def tinygemm_weight(codes: Tensor, scale_zero: Tensor, group_size: int) -> Tensor:
    """W [N, K] in bf16 exactly as tinygemm's CUDA kernel forms it from `int4mm_operands`: scale and zero
    rounded to bf16, then one bf16 fma per weight (`__hfma2((code - 8), scale, zero)`, rounded once).
    The fp32 arithmetic below is exact (a 4-bit integer times an 8-bit significand, plus a zero of at most
    8 scales), so its one rounding to bf16 is the fma's. PyTorch's CPU build of the kernel skips that
    rounding (its weight stays fp32), so only the GPU shows it."""
    scale_zero = scale_zero.to(torch.bfloat16).float().repeat_interleave(group_size, dim=0)  # [K, N, 2]
    w = (codes.t() - 8).float() * scale_zero[..., 0] + scale_zero[..., 1]
    return w.to(torch.bfloat16).t()


def pack_nibble_pairs(codes: Tensor) -> Tensor:
    """Codes [N, K] -> uint8 [N, K/2] as torch._convert_weight_to_int4pack reads them: even k in the high nibble."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)


# ---- loading (called by model.loading when the checkpoint has quantize_config.json) ---------------
def quantize_linears(model: nn.Module, config: GPTQConfig) -> None:
    """Replace every block's projections by GPTQ layers (on the current device, e.g. meta), so that the
    checkpoint is validated against qweight / qzeros / scales / g_idx instead of float weights."""
    for i, block in enumerate(model.transformer.h):
        for name in QUANTIZED:
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, attr)
            _check_layer_shape(config, f"transformer.h.{i}.{name}", linear.in_features, linear.out_features)
            setattr(parent, attr, GPTQLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                             config.group_size, config.desc_act))


def _check_layer_shape(config: GPTQConfig, name: str, in_features: int, out_features: int) -> None:
    if in_features % config.group_size:
        raise QuantizationError(f"{config.source}: group_size {config.group_size} does not divide "
                                f"in_features {in_features} of {name}")
    if in_features % 8 or out_features % 8:
        raise QuantizationError(f"{config.source}: {name} is {out_features} x {in_features}; "
                                f"4-bit packing needs multiples of 8")


def is_quantized_tensor(name: str) -> bool:
    return name.rpartition(".")[2] in GPTQ_TENSORS


def assign(model: nn.Module, name: str, tensor: Tensor, device, source: Path) -> None:
    """Store one GPTQ tensor as it is on disk (int32 codes, fp16 scales), after checking its dtype and groups."""
    module_name, _, attr = name.rpartition(".")
    layer = model.get_submodule(module_name)
    where = f"{source}: tensor {name!r}"
    if attr == "scales" and not tensor.is_floating_point():
        raise QuantizationError(f"{where} is {tensor.dtype}; GPTQ scales are floating point")
    if attr != "scales" and tensor.dtype != torch.int32:
        raise QuantizationError(f"{where} is {tensor.dtype}; GPTQ stores it as int32")
    if attr == "g_idx":
        layer.check_groups(tensor, where)
    setattr(layer, attr, tensor.to(device))


def use_int4mm(model: nn.Module, kernel: str = "triton") -> int:
    """Move every GPTQ layer on a CUDA GPU to `kernel` where it fits ("triton": Triton installed;
    "tinygemm": see `fits_int4mm`), else to the other kernel; the number moved. A layer repacked for
    tinygemm stays there (the GPTQ tensors the Triton kernel reads are gone)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown Int4 kernel {kernel!r} (one of {', '.join(KERNELS)})")
    moved = 0
    for layer in model.modules():
        if not isinstance(layer, GPTQLinear) or layer.kernel in (kernel, "tinygemm"):
            continue
        choice = next((k for k in (kernel, *KERNELS) if layer.fits(k)), None)
        if choice == "tinygemm":
            layer.repack_for_int4mm()
        elif choice == "triton":
            layer.kernel = "triton"
        moved += choice is not None
    return moved


def int4_path(model: nn.Module) -> str | None:
    """Which product the model's GPTQ layers run, for run.json: "triton" (the fused kernel, the
    reference's bits), "tinygemm", "reference", or several joined by "+"; None without GPTQ layers."""
    paths = {layer.kernel or "reference" for layer in model.modules() if isinstance(layer, GPTQLinear)}
    return "+".join(sorted(paths)) or None
