/* Does AMX code written the way llama.cpp writes it run on this machine, built by this compiler?
 *
 * scripts/llama_build.py compiles and runs this before building llama.cpp, with the C++ compiler CMake would use
 * and llama.cpp's optimisation level:  c++ -O2 -march=native -mamx-tile -mamx-int8 amx_probe.cpp -o amx_probe
 * Two things can break llama.cpp's AMX kernels although the CPU reports AMX:
 * - the machine faults on tile instructions (some VMs);
 * - the compiler drops the stores that fill the tile configuration before ldtilecfg. GCC 12 does (it does not see
 *   that ldtilecfg reads the struct): llama.cpp's ggml_tile_config_init then loads garbage, and the process dies
 *   (SIGSEGV/SIGILL) on the first batched matmul once the extra buffer types are on. Measured on a Xeon with
 *   Debian's g++ 12.2: -O0 runs, -O1 and above die.
 * So the probe fills its configuration exactly as llama.cpp does (a default-initialised struct, fields assigned
 * one by one, then _tile_loadconfig), multiplies two int8 tiles with tdpbssd and checks the product.
 * Exit status: 0 tiles work; 3 the CPU does not report AMX-TILE (CPUID); 4 the kernel refuses tile permission;
 * 5 a wrong product; death by a signal: the tile code faults. `--force` runs the tile code even when CPUID or the
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

/* The 64-byte tile configuration ldtilecfg reads (palette 1), declared like llama.cpp's tile_config_t. */
struct tile_config_t {
    uint8_t palette_id = 0;
    uint8_t start_row = 0;
    uint8_t reserved_0[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};

/* Not inlined, like llama.cpp's per-thread init: the stores must survive on their own. */
__attribute__((noinline)) static void configure_tiles() {
    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    tc.rows[0] = 16;  tc.colsb[0] = 64;  /* C: 16 x 16 int32 */
    tc.rows[1] = 16;  tc.colsb[1] = 64;  /* A: 16 x 64 int8 */
    tc.rows[2] = 16;  tc.colsb[2] = 64;  /* B: 16 x (16*4) int8, VNNI layout */
    _tile_loadconfig(&tc);
}

static int cpu_has_amx_tile() {
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

    /* A [16][64] int8, B in VNNI layout [16 groups of 4 k][16 columns][4]: C[m][n] = sum_k A[m][k] * B[k][n]. */
    static int8_t a[16][64], b[16][64];
    static int32_t c[16][16];
    for (int m = 0; m < 16; m++)
        for (int k = 0; k < 64; k++)
            a[m][k] = (int8_t)((m * 7 + k * 3) % 11 - 5);
    for (int k = 0; k < 64; k++)
        for (int n = 0; n < 16; n++)
            b[k / 4][n * 4 + k % 4] = (int8_t)((k * 5 + n) % 9 - 4);

    configure_tiles();
    _tile_zero(0);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, c, 64);
    _tile_release();

    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            int32_t want = 0;
            for (int k = 0; k < 64; k++)
                want += a[m][k] * b[k / 4][n * 4 + k % 4];
            if (c[m][n] != want) {
                printf("AMX wrong: tdpbssd gave %d at [%d][%d], expected %d\n", c[m][n], m, n, want);
                return 5;
            }
        }
    puts("AMX works: tile configuration, tileloadd, tdpbssd and tilestored gave the right product");
    return 0;
}
