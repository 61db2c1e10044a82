"""GPTQ Int4 checkpoints: AutoGPTQ's packing read bit for bit, logits equal the dequantized fp32 model,
the fused Triton kernel equals the invariant reference (Triton's interpreter), tinygemm's operands and
arithmetic, and unsupported settings fail with their file and key.

The tiny checkpoints are quantized here (round to nearest, group size 32) and packed with this file's own
writer, not model.gptq's, so a convention shared by a wrong reader and writer cannot pass unnoticed.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import tiny_model, v11_config, vocab_file
from model import ModelLoadError, Qwen, load_model
from model.engine import Engine
from model.gptq import (QUANTIZED, GPTQLinear, QuantizationError, int4_path, int4mm_operands, pack_int4,
                        pack_nibble_pairs, tinygemm_weight, unpack_int4, use_int4mm)

os.environ["TRITON_INTERPRET"] = "1"  # the fused kernel's tests run on the CPU; set before Triton is imported
torch.set_grad_enabled(False)
GROUP_SIZE = 32


# ---- the format, by hand --------------------------------------------------------------------------
def test_nibble_order_and_zero_offset_by_hand():
    """AutoGPTQ (QuantLinear.pack): input channel 8r+j of qweight row r sits in bits 4j..4j+3, lowest first;
    qzeros packs output channels the same way and stores zero - 1, which dequantization masks, then adds 1."""
    # Codes 1, 2, ..., 8 for input channels 0..7 of output 0: nibbles 0x8 (channel 7) down to 0x1 (channel 0).
    word = 0x87654321 - 2**32  # the top bit is set, so the int32 on disk is negative: -2023406815
    assert torch.equal(unpack_int4(torch.tensor([[word]], dtype=torch.int32), dim=0).flatten(), torch.arange(1, 9))
    assert pack_int4(torch.arange(1, 9)[:, None], dim=0).item() == -2023406815
    # Symmetric 4-bit GPTQ has zero 8 everywhere: stored 7 in every nibble, the word 0x77777777 = 2004318071
    # found in every sym=True AutoGPTQ checkpoint.
    assert pack_int4(torch.full((1, 8), 7), dim=1).item() == 2004318071

    layer = GPTQLinear(8, 8, bias=False, group_size=8, desc_act=False)
    layer.qweight[0, 0] = word  # output 0: codes 1..8 over the inputs
    layer.qweight[0, 1] = 0x000000F0  # output 1: code 15 on input 1, 0 elsewhere
    # Stored zeros for outputs 0..7 are 7, 15, 0, 0, ...: zeros 8, 16 (stored 15 + 1), 1, 1, ...
    layer.qzeros[0, 0] = 0x000000F7
    layer.scales[0, :] = torch.tensor([0.5, 0.25, 1, 1, 1, 1, 1, 1], dtype=torch.float16)
    w = layer.dequantize()
    assert w[0].tolist() == [-3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0]  # 0.5 * (code - 8)
    assert w[1].tolist() == [-4.0, -0.25, -4.0, -4.0, -4.0, -4.0, -4.0, -4.0]  # 0.25 * ([0, 15, 0...] - 16)
    assert w[2].tolist() == [-1.0] * 8  # 1 * (0 - 1)


def test_fused_kernel_byte_layout_by_hand():
    """torch._convert_weight_to_int4pack reads uint8 [N, K/2] with the even k in the high nibble
    (the layout of torch's own int4 tests, `_group_quantize_tensor`)."""
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.int32)
    assert pack_nibble_pairs(codes).tolist() == [[0x12, 0x34], [0xF0, 0x0F]]


def _one_group_layer(code: int, stored_zero: int, scale: float) -> GPTQLinear:
    """8 outputs, one group of 32 inputs, every code `code`."""
    layer = GPTQLinear(32, 8, bias=False, group_size=32, desc_act=False)
    layer.qweight = pack_int4(torch.full((32, 8), code), dim=0)
    layer.qzeros = pack_int4(torch.full((1, 8), stored_zero), dim=1)
    layer.scales = torch.full((1, 8), scale, dtype=torch.float16)
    layer.g_idx = torch.zeros(32, dtype=torch.int32)
    return layer


def test_tinygemm_arithmetic_by_hand():
    """tinygemm (CUDA) rounds scale and folded zero to bf16, then forms each weight with one bf16 fma:
    W = bf16((code - 8) * bf16(scale) + bf16((8 - z) * scale)). `tinygemm_weight` matched the kernel bit for
    bit on an H200 (bench/RESULTS.md, Int4); here its roundings are pinned by hand. bf16 steps are 2^-5
    in [4, 8), and the fp16 scale 1 + 2^-8 + 2^-10 rounds up to the bf16 1 + 2^-7."""
    scale = 1 + 2**-8 + 2**-10
    # symmetric (zero 8, stored 7), code 15: GPTQ's weight 7 * scale = 7.0341796875; the reference rounds it
    # once to 7.03125, tinygemm gets 7 * 1.0078125 = 7.0546875 -> 7.0625: one bf16 step apart
    layer = _one_group_layer(15, stored_zero=7, scale=scale)
    assert layer.dequantize()[0, 0].item() == 7 * scale
    assert layer.dequantize().to(torch.bfloat16)[0, 0].item() == 7.03125
    assert tinygemm_weight(*int4mm_operands(layer)[:2], 32)[0, 0].item() == 7.0625
    # asymmetric zero 3 (stored 2), code 3: GPTQ's weight is exactly 0; the folded zero 5 * scale = 5.0244...
    # rounds to 5.03125, and -5 * 1.0078125 + 5.03125 = -2^-7: tinygemm's weight is not 0
    layer = _one_group_layer(3, stored_zero=2, scale=scale)
    assert layer.dequantize()[0, 0].item() == 0.0
    assert tinygemm_weight(*int4mm_operands(layer)[:2], 32)[0, 0].item() == -2**-7


def test_tinygemm_weight_error_bound():
    """The bound EVALUATION.md states, on random asymmetric layers: with u = 2^-8 (bf16's unit roundoff),
    |W_tinygemm - W| <= e + u (|W| + e), e = u * scale * (|code - 8| + |8 - z|). A wrong zero-point
    convention (say zero = (z - 8) * scale, or z without GPTQ's +1) breaks it by whole scales."""
    gen = torch.Generator().manual_seed(5)
    k, n, group = 256, 64, 64
    layer = GPTQLinear(k, n, bias=False, group_size=group, desc_act=False)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    stored = torch.randint(0, 15, (k // group, n), generator=gen)
    layer.qweight, layer.qzeros = pack_int4(codes, dim=0), pack_int4(stored, dim=1)
    layer.scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3).half()
    layer.g_idx = (torch.arange(k) // group).to(torch.int32)
    exact = layer.dequantize().double()  # [N, K]
    fused = tinygemm_weight(*int4mm_operands(layer)[:2], group).double()
    u = 2.0**-8
    scale = layer.scales.double().repeat_interleave(group, 0).t()
    zero = (stored + 1).double().repeat_interleave(group, 0).t()
    e = u * scale * ((codes.t() - 8).abs() + (8 - zero).abs())
    assert ((fused - exact).abs() <= e + u * (exact.abs() + e)).all()
    assert (fused != exact.to(torch.bfloat16).double()).any()  # and it is not the reference's rounding


# ---- the fused Triton kernel against the reference (Triton's interpreter) --------------------------
@pytest.fixture
def interpreter(monkeypatch, launches_pin_fp_fusion):
    """model.gptq_triton and model.kernels on Triton's interpreter, with its bf16 arithmetic made the GPU's
    (Triton 3.9): its tl.dot multiplies bf16 operands as their raw uint16 bits, and it casts fp32 to bf16
    by truncation. Here bf16 operands are read as numbers and fp32 rounds to the nearest even bf16."""
    pytest.importorskip("triton", minversion="3.7")  # older interpreters break on numpy 2.4
    from triton.runtime import interpreter as interp

    from model import gptq_triton, kernels

    convert, dot, tl = interp._convert_float, interp.InterpreterBuilder.create_dot, interp.tl

    def round_to_bf16(data, src, dst, rounding):
        if (src, dst) != (tl.float32, tl.bfloat16):
            return convert(data, src, dst, rounding)
        return torch.from_numpy(data.astype("float32")).to(torch.bfloat16).view(torch.uint16).numpy()

    def bf16_as_numbers(builder, a, b, d, *args):
        def read(t):
            if t.dtype.scalar != tl.bfloat16:
                return t
            return interp.TensorHandle(convert(t.data, tl.bfloat16, tl.float32, None).view("float32"), tl.float32)
        return dot(builder, read(a), read(b), d, *args)

    monkeypatch.setattr(interp, "_convert_float", round_to_bf16)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", bf16_as_numbers)
    return gptq_triton, kernels


def _random_layer(k: int, n: int, group: int, act_order: bool, exact: bool, seed: int = 0) -> GPTQLinear:
    """Random codes, zeros and scales. exact: power-of-two scales, so that every product and partial sum
    of a test input with few significant bits is exact and any summation order gives the same bits."""
    gen = torch.Generator().manual_seed(seed)
    layer = GPTQLinear(k, n, bias=True, group_size=group, desc_act=act_order)
    layer.qweight = torch.randint(-2**31, 2**31, (k // 8, n), generator=gen, dtype=torch.int64).to(torch.int32)
    layer.qzeros = torch.randint(-2**31, 2**31, (k // group, n // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    if exact:
        layer.scales = (2.0 ** torch.randint(-6, -2, (k // group, n), generator=gen)).half()
    else:
        layer.scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3).half()
    g_idx = torch.arange(k) // group
    layer.g_idx = (g_idx[torch.randperm(k, generator=gen)] if act_order else g_idx).to(torch.int32)
    layer.bias = torch.nn.Parameter(torch.randn(n, generator=gen).to(torch.bfloat16))
    return layer


def _exact_rows(m: int, k: int, seed: int = 1) -> torch.Tensor:
    """Multiples of 1/8 in [-1, 1): three significant bits, exact in bf16."""
    return (torch.randint(-8, 8, (m, k), generator=torch.Generator().manual_seed(seed)) / 8).to(torch.bfloat16)


# K, N, group size, act-order: one tile per group, groups per channel (64 and 32 < BLOCK_K, K not a multiple of
# 64), act-order. The interpreter takes 5-20 s per layout, so only the first is in the quick subset.
LAYOUTS = [(256, 24, 128, False)] + [pytest.param(*layout, marks=pytest.mark.slow)
                                     for layout in [(320, 40, 64, False), (96, 32, 32, False), (192, 24, 64, True)]]


@pytest.mark.parametrize("k, n, group, act_order, dtype", [(*LAYOUTS[0], torch.bfloat16), (*LAYOUTS[0], torch.float16)]
                         + [pytest.param(*p.values, torch.bfloat16, marks=p.marks) for p in LAYOUTS[1:]])
def test_fused_kernel_dequantizes_to_the_reference_weight(interpreter, k, n, group, act_order, dtype):
    """The identity as input reads out the weight the kernel multiplies: GPTQ's exact fp32 value rounded
    once to the model dtype (one-row groups, groups per channel, act-order, K not a multiple of 64)."""
    gptq_triton, _ = interpreter
    layer = _random_layer(k, n, group, act_order, exact=False)
    eye = torch.eye(k, dtype=dtype)
    for tile in (gptq_triton.TILES[0], gptq_triton.TILES[-1]):
        fused = gptq_triton.gptq_matmul(eye, *layer.gptq_tensors(), tile=tile)
        assert torch.equal(fused, layer.dequantize().to(dtype).t()), tile
    assert torch.equal(gptq_triton.dequantize(*layer.gptq_tensors(), dtype), layer.dequantize().to(dtype).t())


# candidates for one row (bench/int4.py): out.T = W x.T; several K steps decoded per loop iteration (K = 384 is 6 steps:
# one iteration of 4, then 2 alone; other layouts end inside a step)
ONE_ROW_TILES = ((16, 32, 4, 4, True), (16, 16, 4, 3, False, 4), (16, 32, 4, 3, True, 2))


@pytest.mark.parametrize("k, n, group, act_order", LAYOUTS)
def test_fused_kernel_equals_the_invariant_reference_at_every_tiling(interpreter, k, n, group, act_order):
    """Dequantize -> kernels.matmul, bit for bit, for row counts across the tile sizes and every tiling
    (exact inputs: the interpreter's numpy products promise no summation order; the GPU bench checks
    the order with random inputs)."""
    gptq_triton, kernels = interpreter
    layer = _random_layer(k, n, group, act_order, exact=True)
    weight = layer.dequantize().to(torch.bfloat16)
    x = _exact_rows(150, k)
    reference = kernels.matmul(x, weight, layer.bias)
    for m in (1, 3, 16, 17, 65, 150):
        assert torch.equal(gptq_triton.gptq_matmul(x[:m], *layer.gptq_tensors(), bias=layer.bias), reference[:m]), m
    for tile in (*gptq_triton.TILES, *(gptq_triton.Tile(*t) for t in ONE_ROW_TILES)):
        assert torch.equal(gptq_triton.gptq_matmul(x, *layer.gptq_tensors(), bias=layer.bias, tile=tile), reference)


def test_every_tiling_compiles_for_hopper():
    """The interpreter runs kernels as Python; only the compiler sees, for one, a return inside a constexpr if."""
    pytest.importorskip("triton", minversion="3.7")
    from model import gptq_triton

    tiles = [json.dumps(list(t)) for t in (*gptq_triton.TILES, *(gptq_triton.Tile(*t) for t in ONE_ROW_TILES))]
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "tests" / "hopper_compile.py"), *tiles], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == len(tiles)


def test_prefill_rows_take_the_reference_itself(interpreter, monkeypatch):
    """Past DEQUANTIZE_ROWS rows the product is the weight decoded once, then kernels.matmul (here from 16 rows,
    to keep the interpreter quick): the fused kernel's bits below the threshold, the reference's above it."""
    gptq_triton, kernels = interpreter
    monkeypatch.setattr(gptq_triton, "DEQUANTIZE_ROWS", 16)
    layer = _random_layer(192, 24, 64, True, exact=True)
    weight = layer.dequantize().to(torch.bfloat16)
    x = _exact_rows(40, 192)
    reference = kernels.matmul(x, weight, layer.bias)
    for m in (16, 17, 40):
        assert torch.equal(gptq_triton.gptq_matmul(x[:m], *layer.gptq_tensors(), bias=layer.bias), reference[:m]), m
    calls = []
    monkeypatch.setattr(gptq_triton, "dequantize", lambda *a: calls.append(a) or weight.t())
    gptq_triton.gptq_matmul(x[:16], *layer.gptq_tensors())
    gptq_triton.gptq_matmul(x[:17], *layer.gptq_tensors())
    assert len(calls) == 1  # 16 rows fused, 17 decoded


@pytest.mark.parametrize("m", [1, 16, 70])
def test_fused_kernel_keeps_the_reference_order(interpreter, m):
    """The contract's order: one fp32 accumulator, K steps of 64 from 0 upward. Every weight is 1, and the
    input puts 2^25, 1, -2^25, 1 at the first channel of K steps 0, 2, 4, 5 (one product per step, so
    no step's own sum can round). In order, 2^25 + 1 rounds back to 2^25 (the fp32 spacing there is 4)
    and the result is 1; a K split into partial sums (the earlier kernel's) gives 0."""
    gptq_triton, kernels = interpreter
    layer = GPTQLinear(384, 16, bias=False, group_size=128, desc_act=False)  # code 2 - zero 1: weights 1
    layer.qweight, layer.qzeros = pack_int4(torch.full((384, 16), 2), dim=0), pack_int4(torch.zeros(3, 16), dim=1)
    layer.scales, layer.g_idx = torch.ones(3, 16, dtype=torch.float16), (torch.arange(384) // 128).to(torch.int32)
    x = torch.zeros(m, 384, dtype=torch.bfloat16)
    x[:, [0, 128, 256, 320]] = torch.tensor([2.0**25, 1.0, -(2.0**25), 1.0], dtype=torch.bfloat16)
    reference = kernels.matmul(x, layer.dequantize().to(torch.bfloat16))
    assert (reference == 1).all()
    for tile in (*gptq_triton.TILES, *(gptq_triton.Tile(*t) for t in ONE_ROW_TILES)):
        assert torch.equal(gptq_triton.gptq_matmul(x, *layer.gptq_tensors(), tile=tile), reference)


def test_layer_forward_takes_the_kernel_it_was_given(interpreter):
    """kernel "triton": the fused product, [B, T, K] in; None: the reference (bit for bit on exact inputs)."""
    from model.ops import CPU

    layer = _random_layer(256, 48, 128, False, exact=True)
    x = _exact_rows(6, 256).view(2, 3, 256)
    reference = layer(x, CPU)
    layer.kernel = "triton"
    assert torch.equal(layer(x, CPU), reference)
    layer.bias = torch.nn.Parameter(layer.bias.float())  # fp32 keeps the reference: tl.dot would round to tf32
    assert torch.equal(layer(x.float(), CPU), torch.nn.functional.linear(x.float(), layer.dequantize(), layer.bias))


def test_int4_path_names_what_runs():
    model = torch.nn.Sequential(_random_layer(64, 8, 32, False, exact=True), _random_layer(64, 8, 32, False, exact=True))
    assert int4_path(torch.nn.Linear(2, 2)) is None
    assert use_int4mm(model) == 0 and int4_path(model) == "reference"  # a CPU model keeps the reference
    model[1].kernel = "triton"
    assert int4_path(model) == "reference+triton"
    with pytest.raises(ValueError, match="unknown Int4 kernel 'marlin'"):
        use_int4mm(model, "marlin")


# ---- a tiny checkpoint, quantized and packed here -------------------------------------------------
def _words(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit values per int32 along `dim`, value j in bits 4j..4j+3 (this file's own writer)."""
    v = values.long().movedim(dim, 0)
    word = torch.zeros(v.shape[0] // 8, *v.shape[1:], dtype=torch.long)
    for j in range(8):
        word |= v[j::8] << (4 * j)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.movedim(0, dim).to(torch.int32).contiguous()


def _quantize(weight: torch.Tensor, g_idx: torch.Tensor):
    """Asymmetric round to nearest per (group, output): codes [K, N], zeros [G, N] in 1..15, fp16 scales [G, N].

    Zero 0 is avoided: AutoGPTQ's writer would store it as -1, which its packing cannot hold.
    """
    w = weight.t().double()  # [K, N]
    n_groups = w.shape[0] // GROUP_SIZE
    lo = torch.stack([w[g_idx == g].min(0).values for g in range(n_groups)]).clamp(max=0)
    hi = torch.stack([w[g_idx == g].max(0).values for g in range(n_groups)]).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-4).half()
    zeros = torch.round(-lo / scales.double()).clamp(1, 15).long()
    codes = (torch.round(w / scales.double()[g_idx]) + zeros[g_idx]).clamp(0, 15).long()
    return codes, zeros, scales


def write_gptq_checkpoint(model: Qwen, directory, desc_act: bool, seed: int = 0) -> dict:
    """An AutoGPTQ-layout checkpoint of `model` (fp16 like the published one); returns the dequantized
    weights [N, K] fp32 the test expects, by layer name."""
    gen = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for name, tensor in model.state_dict().items():
        layer, _, attr = name.rpartition(".")
        if not (layer.endswith(QUANTIZED) and attr == "weight"):
            state[name] = tensor.half()
            continue
        k = tensor.shape[1]
        g_idx = torch.arange(k) // GROUP_SIZE
        if desc_act:  # act-order: groups follow a permutation of the input channels
            g_idx = g_idx[torch.randperm(k, generator=gen)]
        codes, zeros, scales = _quantize(tensor, g_idx)
        state.update({f"{layer}.qweight": _words(codes, 0), f"{layer}.qzeros": _words(zeros - 1, 1),
                      f"{layer}.scales": scales, f"{layer}.g_idx": g_idx.to(torch.int32)})
        expected[layer] = ((codes - zeros[g_idx]).double() * scales.double()[g_idx]).t().float()
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(v11_config(model.args)))
    shutil.copy(vocab_file(), directory / "qwen.tiktoken")
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    quantize_config = {"bits": 4, "group_size": GROUP_SIZE, "damp_percent": 0.01, "desc_act": desc_act,
                       "static_groups": False, "sym": False, "true_sequential": True, "model_name_or_path": None,
                       "model_file_base_name": "model"}
    (directory / "quantize_config.json").write_text(json.dumps(quantize_config))
    return expected


def dequantized_reference(directory, expected: dict, args=None) -> Qwen:
    """The same model in fp32 with plain nn.Linear projections holding the dequantized weights (of the tiny
    model's shape unless `args` says otherwise)."""
    state = {name: t.float() for name, t in load_file(directory / "model.safetensors").items()}
    for layer, weight in expected.items():
        for attr in ("qweight", "qzeros", "scales", "g_idx"):
            del state[f"{layer}.{attr}"]
        state[f"{layer}.weight"] = weight
    model = Qwen(args or tiny_model().args)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["in_order", "desc_act"])
def gptq_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq") / "tiny-int4"
    expected = write_gptq_checkpoint(tiny_model(seed=7), path, desc_act=request.param)
    return path, expected


def test_loads_with_the_packed_weights_bit_for_bit(gptq_checkpoint):
    path, expected = gptq_checkpoint
    model = load_model(path, dtype="fp32", device="cpu")
    assert len(expected) == 5 * model.args.n_layer
    for layer, weight in expected.items():
        quantized = model.get_submodule(layer)
        assert isinstance(quantized, GPTQLinear) and not quantized.fused
        assert torch.equal(quantized.dequantize(), weight), layer
    float_projections = [n for n in model.state_dict() if n.endswith(".weight") and n[:-7].endswith(QUANTIZED)]
    assert float_projections == []  # no full-precision copy of any projection
    assert model.transformer.h[0].attn.c_attn.scales.dtype == torch.float16  # kept as stored
    assert model.lm_head.weight.dtype == model.transformer.wte.weight.dtype == torch.float32


def test_logits_equal_the_dequantized_fp32_model(gptq_checkpoint):
    path, expected = gptq_checkpoint
    model = load_model(path, dtype="fp32", device="cpu")
    reference = dequantized_reference(path, expected)
    ids = torch.randint(0, 151851, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)
    prompts = [ids[0, :5].tolist(), ids[1].tolist()]  # the engine's cached decoding sees the same weights
    quantized = Engine(model, progress=False).generate(prompts, [6, 6], [[], []])
    plain = Engine(reference, progress=False).generate(prompts, [6, 6], [[], []])
    assert [g.tokens for g in quantized] == [g.tokens for g in plain]


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="PyTorch without the CPU int4 kernel")
def test_fused_kernel_operands_equal_the_reference(gptq_checkpoint):
    """What the GPU path hands to tinygemm (codes, folded zero points, act-order permutation), run through
    PyTorch's CPU build of the same kernel, equals the reference product. Only the CUDA op is left untested."""
    path, _ = gptq_checkpoint
    model = load_model(path, dtype="fp32", device="cpu")
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    for layer in (model.transformer.h[0].attn.c_attn, model.transformer.h[1].mlp.c_proj):
        codes, scale_zero, order = int4mm_operands(layer)
        assert (order is None) == (not layer.desc_act)
        rows = x[:, : layer.in_features]
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
        kernel_rows = (rows if order is None else rows[:, order]).contiguous()
        fused = torch._weight_int4pack_mm_for_cpu(kernel_rows, packed, layer.group_size, scale_zero)
        torch.testing.assert_close(fused, rows @ layer.dequantize().t(), rtol=1e-4, atol=1e-4)


# ---- unsupported or broken checkpoints ------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq-errors") / "tiny-int4"
    write_gptq_checkpoint(tiny_model(seed=8), path, desc_act=False)
    return path


def _edited_copy(src, tmp_path, config_edit=None, tensor_edit=None):
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    if config_edit:
        cfg = json.loads((path / "quantize_config.json").read_text())
        config_edit(cfg)
        (path / "quantize_config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        tensors = load_file(path / "model.safetensors")
        tensor_edit(tensors)
        save_file(tensors, path / "model.safetensors")
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(bits=3), r"quantize_config.json: bits 3 is not supported \(only 4-bit GPTQ\)"),
    (lambda c: c.pop("group_size"), r"quantize_config.json: missing key 'group_size'"),
    (lambda c: c.pop("desc_act"), r"quantize_config.json: missing key 'desc_act'"),
    (lambda c: c.update(group_size=-1), r"quantize_config.json: group_size -1 is not supported"),
    (lambda c: c.update(group_size=48), r"quantize_config.json: group_size 48 does not divide in_features 64 "
                                        r"of transformer.h.0.attn.c_attn"),
    (lambda c: c.update(checkpoint_format="gptq_v2"), r"quantize_config.json: checkpoint_format 'gptq_v2'"),
    (lambda c: c.update(quant_method="awq"), r"quantize_config.json: quant_method 'awq' is not supported"),
])
def test_unsupported_quantize_configs(plain_checkpoint, tmp_path, edit, message):
    path = _edited_copy(plain_checkpoint, tmp_path, config_edit=edit)
    with pytest.raises(QuantizationError, match=message):
        load_model(path, device="cpu")


def _settings_in_config_json(src, tmp_path, **changes):
    """A copy whose GPTQ settings sit in config.json's quantization_config (as the Qwen-72B-Chat-Int4 release
    keeps them), without quantize_config.json."""
    path = _edited_copy(src, tmp_path)
    settings = {**json.loads((path / "quantize_config.json").read_text()), "quant_method": "gptq", **changes}
    (path / "quantize_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": settings}))
    return path


def test_gptq_settings_in_config_json_load_as_quantize_config_json(plain_checkpoint, tmp_path):
    path = _settings_in_config_json(plain_checkpoint, tmp_path)
    tokens = torch.tensor([[5, 9, 2, 11]])
    with torch.no_grad():
        expected = load_model(plain_checkpoint, device="cpu")(tokens)
        assert torch.equal(load_model(path, device="cpu")(tokens), expected)
    awq = _settings_in_config_json(plain_checkpoint, tmp_path / "awq", quant_method="awq")
    with pytest.raises(QuantizationError, match=r"config.json quantization_config: quant_method 'awq' is not supported"):
        load_model(awq, device="cpu")


def test_quantize_config_json_and_config_json_must_agree(plain_checkpoint, tmp_path):
    path = _settings_in_config_json(plain_checkpoint, tmp_path, group_size=2 * GROUP_SIZE)
    shutil.copy(plain_checkpoint / "quantize_config.json", path / "quantize_config.json")
    with pytest.raises(QuantizationError, match=r"quantize_config.json \(bits 4, group_size 32, desc_act False\) and "
                                                 r".*config.json quantization_config \(bits 4, group_size 64, .*disagree"):
        load_model(path, device="cpu")


def test_wrong_qweight_shape_names_file_and_tensor(plain_checkpoint, tmp_path):
    name = "transformer.h.0.mlp.w1.qweight"
    path = _edited_copy(plain_checkpoint, tmp_path, tensor_edit=lambda t: t.update({name: t[name][:-1].clone()}))
    message = rf"model.safetensors: tensor '{name}' has shape \[7, 96\], config says \[8, 96\]"
    with pytest.raises(ModelLoadError, match=message):
        load_model(path, device="cpu")


def test_bad_gptq_tensors_name_file_and_tensor(plain_checkpoint, tmp_path):
    name = "transformer.h.1.attn.c_proj.qweight"
    path = _edited_copy(plain_checkpoint, tmp_path, tensor_edit=lambda t: t.update({name: t[name].float()}))
    message = rf"model.safetensors: tensor '{name}' is torch.float32; GPTQ stores it as int32"
    with pytest.raises(QuantizationError, match=message):
        load_model(path, device="cpu")

    name = "transformer.h.0.mlp.w2.g_idx"
    path = _edited_copy(plain_checkpoint, tmp_path / "b", tensor_edit=lambda t: t.update({name: t[name].flip(0)}))
    message = rf"tensor '{name}': groups are not in input order although desc_act is false"
    with pytest.raises(QuantizationError, match=message):
        load_model(path, device="cpu")
