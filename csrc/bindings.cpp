// Registration only. The schema of pytorch_mqa::attention_with_kv_cache_cuda is defined once, in
// Python (pytorch_mqa/ops/library.py), so it exists without compiling anything.
#include <torch/library.h>

#include "attention_with_kv_cache.h"

TORCH_LIBRARY_IMPL(pytorch_mqa, CUDA, m) {
  m.impl("attention_with_kv_cache_cuda", &pytorch_mqa::attention_with_kv_cache_cuda);
}
