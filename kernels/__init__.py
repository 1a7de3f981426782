"""Triton kernels of pytorch_mqa (installed as pytorch_mqa.kernels).

One module per op: `attention` (forward + backward) and `attention_with_kv_cache` (decode with
fused cache append). Each holds @triton.jit kernels and a thin launcher; registration lives in
pytorch_mqa/ops/library.py.
"""
