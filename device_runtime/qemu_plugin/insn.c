/* mntool's instruction-count plugin for qemu-aarch64 (user mode, TCG plugin API v1).
 *
 * Counts every executed guest instruction, and those of them that are A64 SIMD/FP (the
 * "scalar FP and Advanced SIMD" data-processing group, and loads/stores of FP/SIMD registers),
 * with one inline add per translated block (no callback per instruction). The guest marks
 * regions with an unused syscall number (MNTOOL_MARK_SYSCALL, argument 1 = a tag); on each mark
 * the plugin appends "tag instructions simd_fp" to the file named by its `out=PATH` argument.
 * The guest gets ENOSYS back and carries on. Build: gcc -O2 -shared -fPIC -o libinsn.so insn.c */
#include <stdio.h>
#include <string.h>

#include "qemu_plugin_api.h"

#define MNTOOL_MARK_SYSCALL 0x4d4e /* "MN": far above any aarch64 Linux syscall number */

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t insns;   /* executed instructions, all vCPUs (mntool runs one guest thread) */
static uint64_t simd_fp; /* of which A64 SIMD/FP */
static FILE *out;

static int is_simd_fp(uint32_t w)
{
    if (((w >> 25) & 0x7) == 0x7) /* op0 = x111: data processing, scalar FP and Advanced SIMD */
        return 1;
    return ((w >> 25) & 0x5) == 0x4 && ((w >> 26) & 1); /* op0 = x1x0 with V = 1: FP/SIMD load/store */
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb), simd = 0;
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t word = 0;
        if (qemu_plugin_insn_size(insn) == 4) {
            memcpy(&word, qemu_plugin_insn_data(insn), 4);
            simd += is_simd_fp(word);
        }
    }
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, n);
    if (simd)
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &simd_fp, simd);
}

static void syscall_cb(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num == MNTOOL_MARK_SYSCALL && out) {
        fprintf(out, "%llu %llu %llu\n", (unsigned long long)a1, (unsigned long long)insns,
                (unsigned long long)simd_fp);
        fflush(out);
    }
}

static void at_exit(qemu_plugin_id_t id, void *userdata)
{
    if (out) {
        fprintf(out, "exit %llu %llu\n", (unsigned long long)insns, (unsigned long long)simd_fp);
        fclose(out);
        out = NULL;
    }
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "out=", 4) == 0)
            out = fopen(argv[i] + 4, "w");
    if (!out) {
        fprintf(stderr, "mntool insn plugin: needs out=PATH\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, syscall_cb);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
