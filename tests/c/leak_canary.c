/* Deliberately leaks a model: the ASan run expects LeakSanitizer to report it,
 * which proves leak checking is really on for postflow's allocations. */
#include <stdio.h>

#include "common.h"

int main(void) {
    pf_model *m = load_fixture("affine_reg");
    printf("leak_canary: loaded %p and not freeing it\n", (void *)m);
    m = NULL;
    return 0;
}
