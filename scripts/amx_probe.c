/* Does this machine run AMX tile instructions, as llama.cpp's AMX code does, without faulting?
 *
 * Some VMs report amx_tile in /proc/cpuinfo, yet the first tile instruction kills the process. scripts/llama_build.py
 * compiles and runs this before building llama.cpp:  cc -O0 -mamx-tile scripts/amx_probe.c -o amx_probe
 * Exit status: 0 tiles work; 3 the CPU does not report AMX-TILE (CPUID); 4 the kernel refuses tile permission;
 * death by a signal: the tile instructions fault here. `--force` runs the tile instructions even when CPUID or the
 * kernel say no (the tests use it to see the fault path on a CPU without AMX).
 */
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* The 64-byte tile configuration that ldtilecfg reads (palette 1). */
struct tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];  /* bytes per row of each tile */
    uint8_t rows[16];
};

static int cpu_has_amx_tile(void) {
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
        return 0;
    return (edx >> 24) & 1; /* CPUID.(EAX=7,ECX=0):EDX[24] = AMX-TILE */
}

int main(int argc, char **argv) {
    int force = argc > 1 && strcmp(argv[1], "--force") == 0;
    if (!cpu_has_amx_tile() && !force) {
        puts("no AMX: CPUID does not report AMX-TILE");
        return 3;
    }
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0 && !force) {
        puts("AMX refused: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed");
        return 4;
    }
    fflush(stdout);

    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    cfg.rows[0] = 16;
    cfg.colsb[0] = 64;
    int32_t out[16][16];
    memset(out, 0xff, sizeof out);

    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_stored(0, out, 64);
    _tile_release();

    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
            if (out[r][c] != 0) {
                puts("AMX wrong: tilezero then tilestored did not write zeros");
                return 5;
            }
    puts("AMX works: ldtilecfg, tilezero, tilestored and tilerelease ran");
    return 0;
}
