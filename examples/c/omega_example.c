/* The C SDK guide's example (docs/c-sdk.md): open a brain, learn from one viewing event,
 * ask for recommendations, close. Built against the packaged library with pkg-config or
 * CMake (scripts/package.sh tests both, on x86-64 and under qemu for ARM).
 *
 *   omega_example DB_PATH [CATALOGUE_JSON]
 *
 * Assets (model, tokenizer, and ONNX Runtime for that backend) come from the environment:
 * OMEGA_MODEL_PATH / OMEGA_TRACT_MODEL_PATH, OMEGA_TOKENIZER_PATH, ORT_DYLIB_PATH, or
 * OMEGA_CACHE; a real program would put them in the config's "embedder" object. */
#include "omega.h"
#include <stdio.h>
#include <string.h>

static int fail(const char *what) {
    char msg[1024];
    omega_last_error_message(msg, sizeof msg);
    fprintf(stderr, "%s: %s\n", what, msg);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s DB_PATH [CATALOGUE_JSON]\n", argv[0]);
        return 2;
    }
    /* A library of another ABI major than this header's would misread the calls. */
    if ((omega_abi_version() >> 16) != OMEGA_ABI_VERSION_MAJOR) {
        fprintf(stderr, "libomega_device ABI %u.%u, this program needs %u.x\n",
                omega_abi_version() >> 16, omega_abi_version() & 0xffff, OMEGA_ABI_VERSION_MAJOR);
        return 1;
    }
    char cfg[2048];
    if (argc > 2)
        snprintf(cfg, sizeof cfg, "{\"db_path\": \"%s\", \"catalogue_path\": \"%s\"}", argv[1], argv[2]);
    else
        snprintf(cfg, sizeof cfg, "{\"db_path\": \"%s\"}", argv[1]);

    OmegaBrain *brain = NULL;
    if (omega_brain_open(cfg, &brain) != OMEGA_OK) return fail("open");
    printf("omega %s, ABI %u.%u\n", omega_version(), omega_abi_version() >> 16,
           omega_abi_version() & 0xffff);

    char buf[8192];
    int64_t n = omega_brain_observe(brain,
        "{\"content_id\":\"heat\",\"title\":\"Heat\",\"genres\":[\"crime\",\"thriller\"],"
        "\"content_type\":\"movie\",\"started_at_ms\":1704573000000,\"watch_fraction\":0.9}",
        buf, sizeof buf);
    if (n < 0) return fail("observe");
    printf("observe: %s\n", buf);

    n = omega_brain_recommend(brain, "{\"time_slot\": \"evening\"}", 10, buf, sizeof buf);
    if (n < 0) return fail("recommend");
    if (n >= (int64_t)sizeof buf) {
        /* Grow to n + 1 bytes and call omega_brain_last_result; 10 results always fit here. */
        fprintf(stderr, "recommend: %lld bytes do not fit\n", (long long)n);
        return 1;
    }
    printf("recommend: %s\n", buf);
    if (strcmp(buf, "[]") == 0)
        /* Recommendations are drawn from contents the brain knows it could propose: a
         * catalogue (config "catalogue_path") or global patterns from a shard (a sync).
         * What was watched is never proposed again, so a fresh brain with neither has
         * nothing to say yet. */
        printf("(empty: no catalogue and no sync yet; pass a catalogue file, or sync)\n");

    /* k above OMEGA_MAX_K is a caller's mistake, refused rather than clamped. */
    if (omega_brain_recommend(brain, NULL, OMEGA_MAX_K + 1, buf, sizeof buf) != OMEGA_ERR_INVALID)
        return fail("recommend with k > OMEGA_MAX_K was not refused");

    /* Syncing (on a background thread, every "next_sync_in_ms") would go here:
     * omega_brain_sync(brain, "{\"endpoint\": \"https://shard.example:50051\"}", buf, sizeof buf); */

    if (omega_brain_close(brain) != OMEGA_OK) return fail("close");
    printf("example done\n");
    return 0;
}
