/* Fuzz target: qk_version.  It takes no input; the harness exists so that
 * every entry point has its own target and execution count, and it pins the
 * contract that the version is positive and the same on every call. */
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    (void)data;
    (void)size;
    static int first = 0;
    const int v = qk_version();
    FZ_CHECK(v >= 1);
    if (first == 0) first = v;
    FZ_CHECK(v == first);
    return 0;
}
