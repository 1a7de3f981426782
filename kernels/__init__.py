"""Triton kernels of pytorch_mqa (installed as pytorch_mqa.kernels).

One module per op: `attention` (forward + backward) and `attention_with_kv_cache` (decode with
the cache append fused into the attention pass). Each holds @triton.jit kernels and a thin
launcher; `common` holds what they share (constants, launch flags, `sm_count`, the packed-row
index math, the online-softmax step and epilogue). Registration lives in pytorch_mqa/ops/library.py.
"""
