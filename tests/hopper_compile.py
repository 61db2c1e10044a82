"""Compile model.gptq_triton's kernels for an H100 (sm_90) on a CPU, one tiling per JSON argument.

Triton's interpreter runs a kernel as Python, so it passes code that the compiler rejects (an early return
inside a constexpr `if` is one). Run without TRITON_INTERPRET; tests/test_gptq.py calls it in a subprocess.
"""
import inspect
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from model import gptq_triton, kernels

HOPPER = GPUTarget("cuda", 90, 32)
POINTERS = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*bf16", "qzeros_ptr": "*i32",
            "g_idx_ptr": "*i32", "bias_ptr": "*bf16", "out_ptr": "*bf16"}


def compile_for_hopper(kernel, constexprs: dict, warps: int = 4, stages: int = 3):
    """The kernel compiled to a cubin; arguments not named in POINTERS or constexprs are int32."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: "constexpr" if name in constexprs else POINTERS.get(name, "i32") for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=HOPPER, options={"num_warps": warps, "num_stages": stages,
                                                          "enable_fp_fusion": kernels.FP_FUSION})


def main():
    for act_order in (False, True):
        compile_for_hopper(gptq_triton._dequantize_kernel, dict(GROUP_SIZE=128, ACT_ORDER=act_order,
                                                                  BLOCK_K=gptq_triton.BLOCK_K, BLOCK_N=64))
    for argument in sys.argv[1:]:
        tile = gptq_triton.Tile(*json.loads(argument))
        compile_for_hopper(gptq_triton._matmul_kernel, dict(
            GROUP_SIZE=128, ACT_ORDER=True, HAS_BIAS=True, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
            BLOCK_K=gptq_triton.BLOCK_K, GROUP_M=8, WEIGHTS_FIRST=tile.weights_first, K_STEPS=tile.k_steps),
            tile.warps, tile.stages)
        print("compiled", tile, flush=True)


if __name__ == "__main__":
    main()
