/* splice's decode replay (linked into a CPU model.so by backends/tvm/build.py; driven by
 * runtime/tvm_replay.py): the kernel calls of a recorded decode step, run in order from one C
 * loop instead of the Relax VM's instructions around them.
 *
 * Each call is a library function's C entry point (TVM FFI's TVMFFISafeCallType: the
 * `__tvm_ffi_<name>` symbol) with its argument array, prepared once by the runtime (tensor
 * handles and integers in TVMFFIAny's 16-byte layout); the kernels return nothing, so the result
 * slot is scratch. The loop stops at the first kernel that fails: its index plus one.
 */
#include <stdint.h>

typedef struct {
  int32_t type_index;
  uint32_t padding;
  int64_t value;
} splice_any; /* TVMFFIAny */

typedef int (*splice_safe_call)(void* self, const splice_any* args, int32_t num_args,
                                splice_any* result);

typedef struct {
  splice_safe_call fn;
  const splice_any* args;
  int64_t num_args;
} splice_call;

int splice_replay(const splice_call* calls, int n) {
  for (int i = 0; i < n; ++i) {
    splice_any result = {0, 0, 0};
    if (calls[i].fn(0, calls[i].args, (int32_t)calls[i].num_args, &result) != 0) return i + 1;
  }
  return 0;
}
