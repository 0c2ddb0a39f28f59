/*
 * Native kernels for the engine's recurrent step (see streamlstm/kernels.py).
 *
 * Why: stepping through nn.LSTM needs the streams' h and c rows gathered into
 * a batch and the new rows scattered back, four extra passes over the state
 * in memory. Here the LSTM cell reads c and writes c and h straight at the
 * streams' slots in the store, and writes the new h where the next matrix
 * product reads it; only the h rows are gathered, into the product's input.
 * The matrix products stay with torch (MKL / oneDNN).
 *
 * Built by setup.py as an extension module so that pip compiles it; Python
 * calls the plain C functions through ctypes. It holds no Python objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

/*
 * -ffast-math is a compile flag only (never linked, so it does not change the
 * process's floating-point mode); it lets GCC call glibc's vector expf. The
 * cell is cloned for AVX-512, AVX2 and baseline x86-64 and the loader picks
 * the best one the CPU has, so a built wheel runs on any x86-64.
 */
#if defined(SL_TARGET_CLONES) && defined(__GNUC__) && !defined(__clang__)
#define SL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SL_CLONES
#endif

/* Parallel loops only where a batch is worth waking the thread pool for. */
#define SL_PARALLEL_MIN 16384

static inline float sl_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* dst[i, off : off + width] = src[slots[i], :] for i < n; dst rows are ld apart. */
void sl_gather(const float *src, const int64_t *slots, int64_t n, int64_t width, float *dst,
               int64_t ld, int64_t off) {
#pragma omp parallel for schedule(static) if (n * width > SL_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + i * ld + off, src + slots[i] * width, (size_t)width * sizeof(float));
}

/*
 * One LSTM cell for n distinct slots. gates [n, 4H] are x W_ih^T + h W_hh^T +
 * b_ih + b_hh in PyTorch's order (i, f, g, o). c = f * c + i * g and
 * h = o * tanh(c) are written to the stores h, c [capacity, H] at slots[i],
 * and h also to out[i, :H] (rows ld apart).
 */
SL_CLONES void sl_lstm_cell(const float *gates, const int64_t *slots, int64_t n, int64_t hidden, float *hs,
                  float *cs, float *out, int64_t ld) {
#pragma omp parallel for schedule(static) if (n * hidden > SL_PARALLEL_MIN)
    for (int64_t r = 0; r < n; r++) {
        const float *g = gates + r * 4 * hidden;
        float *c = cs + slots[r] * hidden;
        float *h = hs + slots[r] * hidden;
        float *o = out + r * ld;
#pragma omp simd
        for (int64_t j = 0; j < hidden; j++) {
            float in_gate = sl_sigmoid(g[j]);
            float forget = sl_sigmoid(g[hidden + j]);
            float cand = 2.0f * sl_sigmoid(2.0f * g[2 * hidden + j]) - 1.0f; /* tanh */
            float out_gate = sl_sigmoid(g[3 * hidden + j]);
            float cell = forget * c[j] + in_gate * cand;
            float hid = out_gate * (2.0f * sl_sigmoid(2.0f * cell) - 1.0f);
            c[j] = cell;
            h[j] = hid;
            o[j] = hid;
        }
    }
}

/* An importable module only so that setuptools builds and installs the library. */
static struct PyModuleDef sl_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                       "C kernels of the engine, called through ctypes.", -1,
                                       NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&sl_module); }
