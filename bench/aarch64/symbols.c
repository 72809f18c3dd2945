/* Tern's per-function instruction counter for qemu-user (plugin API v1,
 * Debian 12's qemu 7.2): like insn.c, but each translated block's count
 * goes to the symbol of the function its first instruction lies in, so a
 * run says where its instructions went.
 *
 *   qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu \
 *       -plugin ./libsymbols.so,out=COUNTS tern-device classify B IMG
 *
 * writes one line per function, `count<TAB>mangled symbol`, to COUNTS at exit
 * (`?` for code outside the binary's symbol table: the shared libraries).
 * Run the unstripped binary (qemu reads the symbols from it); a function
 * inlined into another counts as its caller. Single-threaded guests only. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*udata_cb)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const char *qemu_plugin_insn_symbol(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb cb, void *userdata);
void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* One slot per distinct symbol pointer (qemu's strings live as long as the
 * run), open addressing; the table never fills (a binary has fewer). */
#define SLOTS (1 << 18)
struct slot {
    const char *symbol;
    uint64_t count;
};
static struct slot *slots;
static struct slot unknown;
static char out_path[4096];

static struct slot *slot_of(const char *symbol) {
    if (symbol == NULL) {
        return &unknown;
    }
    size_t h = ((uintptr_t)symbol >> 3) * 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < SLOTS; i++) {
        struct slot *s = &slots[(h + i) & (SLOTS - 1)];
        if (s->symbol == symbol || s->symbol == NULL) {
            s->symbol = symbol;
            return s;
        }
    }
    return &unknown;
}

static void translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    const char *symbol = qemu_plugin_insn_symbol(qemu_plugin_tb_get_insn(tb, 0));
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &slot_of(symbol)->count,
                                             qemu_plugin_tb_n_insns(tb));
}

static void finished(qemu_plugin_id_t id, void *userdata) {
    (void)id;
    (void)userdata;
    FILE *f = out_path[0] != '\0' ? fopen(out_path, "w") : NULL;
    if (f == NULL) {
        qemu_plugin_outs("symbols: cannot open out=\n");
        return;
    }
    fprintf(f, "%llu\t?\n", (unsigned long long)unknown.count);
    for (size_t i = 0; i < SLOTS; i++) {
        if (slots[i].symbol != NULL && slots[i].count > 0) {
            fprintf(f, "%llu\t%s\n", (unsigned long long)slots[i].count, slots[i].symbol);
        }
    }
    fclose(f);
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
    slots = calloc(SLOTS, sizeof *slots);
    if (slots == NULL) {
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, translated);
    qemu_plugin_register_atexit_cb(id, finished, NULL);
    return 0;
}
