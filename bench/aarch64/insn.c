/* Tern's instruction counter for qemu-user (plugin API v1, Debian 12's
 * qemu 7.2): counts the guest instructions a program executes, by adding
 * each translated block's length to a counter every time the block runs.
 *
 *   qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu \
 *       -plugin ./libinsn.so,out=COUNT_FILE  tern-device classify B IMG
 *
 * writes the total, a decimal number and a newline, to COUNT_FILE at exit
 * (without out=, to qemu's log: add -d plugin). The count is deterministic
 * for the same binary, arguments and CPU model, so two builds or two
 * bundles compare with no noise; it is a proxy for work, not a time.
 * Single-threaded guests only: the inline add is not atomic. The API's few
 * declarations are written out below because Debian ships no qemu-plugin.h. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*udata_cb)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb cb, void *userdata);
void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t executed;
static char out_path[4096];

static void translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &executed, qemu_plugin_tb_n_insns(tb));
}

static void finished(qemu_plugin_id_t id, void *userdata) {
    (void)id;
    (void)userdata;
    char line[32];
    snprintf(line, sizeof line, "%llu\n", (unsigned long long)executed);
    if (out_path[0] != '\0') {
        FILE *f = fopen(out_path, "w");
        if (f != NULL) {
            fputs(line, f);
            fclose(f);
            return;
        }
    }
    qemu_plugin_outs("insns ");
    qemu_plugin_outs(line);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc,
                                                               char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            size_t n = strlen(argv[i] + 4);
            if (n == 0 || n >= sizeof out_path) {
                return -1;
            }
            memcpy(out_path, argv[i] + 4, n + 1);
        } else {
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, translated);
    qemu_plugin_register_atexit_cb(id, finished, NULL);
    return 0;
}
