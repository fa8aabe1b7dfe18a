/* Drives the C ABI end to end: bad assets and configs, open, observe, recommend (with a
 * buffer too small), score, stats, sync to a dead shard then to a live one, bad JSON,
 * oversized input, close, reopen and sync again with the kept token. Argument 1: a scratch folder; argument 2: a file that is not a
 * shared library; argument 3: the endpoint of a live shard. Exit code 0 = all checks passed. */
#include "omega.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
#define CHECK(cond, what)                                                        \
    do {                                                                         \
        if (!(cond)) {                                                           \
            char msg[512];                                                       \
            omega_last_error_message(msg, sizeof msg);                           \
            fprintf(stderr, "FAIL %s (line %d): last error: %s\n", what, __LINE__, msg); \
            failures++;                                                          \
        }                                                                        \
    } while (0)

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    char cfg[2048];
    char buf[8192];
    OmegaBrain *brain = NULL;

    /* ONNX Runtime not loadable: a clear error, no crash (nothing loaded it yet here). */
    snprintf(cfg, sizeof cfg, "{\"embedder\": {\"ort_dylib_path\": \"%s\"}}", argv[2]);
    CHECK(omega_brain_open(cfg, &brain) == OMEGA_ERR_ASSET, "bad ORT library is an asset error");
    CHECK(brain == NULL, "no handle on error");
    CHECK(omega_last_error_message(buf, sizeof buf) > 0 && strstr(buf, "ONNX Runtime") != NULL,
          "message names ONNX Runtime");

    /* A failed open leaves NULL behind, whatever the pointer held before. */
    brain = (OmegaBrain *)&failures;
    CHECK(omega_brain_open("{\"embedder\": {\"model_path\": \"/nonexistent/model.onnx\"}}",
                           &brain) == OMEGA_ERR_ASSET,
          "missing model is an asset error");
    CHECK(brain == NULL, "handle reset to NULL on error");
    CHECK(omega_last_error_message(buf, sizeof buf) > 0 && strstr(buf, "model.onnx") != NULL,
          "message names the model file");
    CHECK(omega_brain_open("{\"embedder\": {\"cache_capacity\": 1000000000000}}", &brain) ==
              OMEGA_ERR_INVALID,
          "absurd cache capacity is refused, not allocated");
    CHECK(omega_brain_open("{not json", &brain) == OMEGA_ERR_JSON, "malformed config");
    CHECK(omega_brain_open("{\"max_patterns\": \"many\"}", &brain) == OMEGA_ERR_JSON, "wrong type");
    CHECK(omega_brain_open(NULL, NULL) == OMEGA_ERR_NULL, "null out pointer");

    snprintf(cfg, sizeof cfg, "{\"db_path\": \"%s/c.sqlite\", \"device_id\": \"tv-c\"}", argv[1]);
    CHECK(omega_brain_open(cfg, &brain) == OMEGA_OK, "open");
    if (brain == NULL) return 1;

    const char *ev =
        "{\"content_id\":\"heat\",\"title\":\"Heat\",\"genres\":[\"crime\",\"thriller\"],"
        "\"content_type\":\"movie\",\"started_at_ms\":1704573000000,\"watch_fraction\":0.9}";
    int64_t n = omega_brain_observe(brain, ev, buf, sizeof buf);
    CHECK(n > 0 && n < (int64_t)sizeof buf && strstr(buf, "\"created\":true") != NULL, "observe");
    CHECK(omega_brain_observe(brain, "{\"content_id\": 5}", buf, sizeof buf) == OMEGA_ERR_JSON,
          "observe: wrong-typed field");
    CHECK(omega_brain_observe(brain,
                              "{\"content_id\":\"x\",\"started_at_ms\":1,\"watch_fraction\":2.5}",
                              buf, sizeof buf) == OMEGA_ERR_INVALID,
          "observe: out of range");
    CHECK(omega_brain_observe(brain,
                              "{\"content_id\":\"x\",\"started_at_ms\":1,\"watch_fraction\":1e39}",
                              buf, sizeof buf) == OMEGA_ERR_INVALID,
          "observe: 1e39 does not fit an f32");
    {
        /* Larger than the protocol's largest message: refused before parsing. */
        size_t len = (2u << 20);
        char *huge = malloc(len + 1);
        memset(huge, ' ', len);
        huge[len] = 0;
        CHECK(omega_brain_observe(brain, huge, buf, sizeof buf) == OMEGA_ERR_INVALID,
              "observe: oversized input");
        free(huge);
    }
    CHECK(omega_brain_observe(brain, NULL, buf, sizeof buf) == OMEGA_ERR_NULL, "observe: null");
    CHECK(omega_brain_observe(NULL, ev, buf, sizeof buf) == OMEGA_ERR_NULL, "observe: null brain");

    /* Global patterns: a trend, so that recommend has something to return. */
    CHECK(omega_brain_apply_global(
              brain, "{\"similar\":[],\"trending\":[{\"target\":{\"content_id\":\"worldcup\"},"
                     "\"score\":2.0,\"region\":\"eu\"}],\"global_version\":3,\"model_id\":\"\"}") ==
              OMEGA_OK,
          "apply_global");

    char small[8];
    int64_t need = omega_brain_recommend(brain, "{\"time_slot\":\"evening\"}", 5, small, sizeof small);
    CHECK(need >= (int64_t)sizeof small, "buffer too small returns the needed length");
    {
        char msg[512], tiny[4];
        CHECK(omega_last_error_message(msg, sizeof msg) > 0 && strstr(msg, "buffer too small") != NULL,
              "buffer too small is explained");
        int64_t len = omega_last_error_message(tiny, sizeof tiny);
        CHECK(len >= (int64_t)sizeof tiny && tiny[0] == 0, "a message too long for the buffer");
        CHECK(omega_last_error_message(msg, sizeof msg) == len, "reading never changes the message");
    }
    char *big = malloc((size_t)need + 1);
    CHECK(omega_brain_last_result(brain, big, (size_t)need + 1) == need, "last_result");
    CHECK(strstr(big, "worldcup") != NULL && strstr(big, "\"source\":\"trending\"") != NULL,
          "recommendation JSON");
    free(big);
    CHECK(omega_brain_recommend(brain, NULL, 5, NULL, 0) > 0, "length query with NULL buffer");

    n = omega_brain_score(brain, NULL, "[\"worldcup\", \"unknown-id\"]", buf, sizeof buf);
    CHECK(n > 0 && strstr(buf, "-1") != NULL, "score");
    CHECK(omega_brain_score(brain, NULL, "{\"a\":1}", buf, sizeof buf) == OMEGA_ERR_JSON,
          "score: not an array");

    n = omega_brain_stats(brain, buf, sizeof buf);
    CHECK(n > 0 && strstr(buf, "\"patterns\":1") != NULL && strstr(buf, "\"device_id\":\"tv-c\"") != NULL,
          "stats");

    n = omega_brain_sync(brain,
                         "{\"endpoint\":\"http://127.0.0.1:9\",\"allow_plaintext\":true,\"token\":\"t\",\"max_attempts\":1,"
                         "\"timeout_ms\":500,\"connect_timeout_ms\":500}",
                         buf, sizeof buf);
    CHECK(n == OMEGA_ERR_UNAVAILABLE, "sync to a dead shard is unavailable");
    CHECK(omega_brain_sync(brain, "{\"endpoint\": 3}", buf, sizeof buf) == OMEGA_ERR_JSON,
          "sync: bad config");
    n = omega_brain_stats(brain, buf, sizeof buf);
    CHECK(strstr(buf, "\"delta_in_flight\":true") != NULL, "the delta waits for the next sync");

    /* A live shard: register (no token given), push the waiting delta. */
    char sync_cfg[1024];
    snprintf(sync_cfg, sizeof sync_cfg, "{\"endpoint\": \"%s\", \"allow_plaintext\": true, \"region\": \"eu\"}", argv[3]);
    n = omega_brain_sync(brain, sync_cfg, buf, sizeof buf);
    CHECK(n > 0 && n < (int64_t)sizeof buf, "sync to a live shard");
    CHECK(strstr(buf, "\"acknowledged\":true") != NULL, "the shard acknowledged the delta");
    CHECK(strstr(buf, "\"registered\":true") != NULL, "the first sync registered");
    CHECK(strstr(buf, "\"next_sync_in_ms\":") != NULL, "the report says when to sync next");
    n = omega_brain_stats(brain, buf, sizeof buf);
    CHECK(strstr(buf, "\"delta_in_flight\":false") != NULL, "nothing waits any more");
    CHECK(strstr(buf, "\"has_token\":true") != NULL, "the brain keeps the device token");
    /* Restore the config path used below. */
    snprintf(cfg, sizeof cfg, "{\"db_path\": \"%s/c.sqlite\", \"device_id\": \"tv-c\"}", argv[1]);

    CHECK(strlen(omega_version()) > 0, "version");
    CHECK(omega_brain_close(brain) == OMEGA_OK, "close");
    CHECK(omega_brain_close(NULL) == OMEGA_OK, "close NULL");

    /* Reopen (a TV reboot): the pattern and the token survived, and the same config (no
     * token) syncs again without registering (the shard would refuse a known id without its
     * token). */
    CHECK(omega_brain_open(cfg, &brain) == OMEGA_OK, "reopen");
    n = omega_brain_stats(brain, buf, sizeof buf);
    CHECK(strstr(buf, "\"patterns\":1") != NULL, "pattern persisted");
    CHECK(strstr(buf, "\"has_token\":true") != NULL, "token persisted");
    const char *ev2 =
        "{\"content_id\":\"casino\",\"title\":\"Casino\",\"genres\":[\"crime\"],"
        "\"content_type\":\"movie\",\"started_at_ms\":1704573600000,\"watch_fraction\":0.9}";
    CHECK(omega_brain_observe(brain, ev2, buf, sizeof buf) > 0, "observe after the reopen");
    n = omega_brain_sync(brain, sync_cfg, buf, sizeof buf);
    CHECK(n > 0 && n < (int64_t)sizeof buf, "sync after the reopen");
    CHECK(strstr(buf, "\"acknowledged\":true") != NULL, "the second open's delta acknowledged");
    CHECK(strstr(buf, "\"registered\":false") != NULL, "no second registration");
    CHECK(omega_brain_close(brain) == OMEGA_OK, "close again");

    if (failures == 0) printf("c smoke: all checks passed\n");
    return failures == 0 ? 0 : 1;
}
