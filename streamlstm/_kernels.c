/*
 * Native kernels for the engine's recurrent step (see streamlstm/kernels.py).
 *
 * Why: stepping through nn.LSTM needs the streams' h and c rows gathered into
 * a batch and the new rows scattered back, four extra passes over the state
 * in memory. Here the cell (LSTM, GRU or plain RNN; one product per layer,
 * a GRU's two or three, see sl_gates) reads c and writes c and h straight at the streams' slots in
 * the store (a GRU's or RNN's state is h alone), and writes the new h where
 * the next matrix product reads it; only the h rows are gathered, into the
 * product's input.
 * The matrix products are OpenBLAS's cblas_sgemm, from the scipy-openblas32
 * wheel (built to be linked against: its symbols carry a scipy_ prefix, and
 * kernels.py imports the wheel first, which loads the library globally).
 *
 * Built by setup.py as an extension module so that pip compiles it; Python
 * calls the plain C functions (gather, cell, step) through ctypes, and they
 * touch no Python objects. The module also defines the store's SlotMap type
 * (below), which holds references to its str keys.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

#include <cblas.h>

/*
 * -ffast-math is a compile flag only (never linked, so it does not change the
 * process's floating-point mode); it lets GCC vectorize the cell's loop
 * (floorf, the clamps) without IEEE corner cases. The cell is cloned for
 * AVX-512, AVX2 and baseline x86-64 and the loader picks the best one the
 * CPU has, so a built wheel runs on any x86-64.
 */
#if defined(SL_TARGET_CLONES) && defined(__GNUC__) && !defined(__clang__)
#define SL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SL_CLONES
#endif

/* Parallel loops only where a batch is worth waking the thread pool for. */
#define SL_PARALLEL_MIN 16384

/*
 * e^x inline, for |x| <= 88: 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2,
 * and e^r = 1 + r + r^2 q(r), q of degree 3 fitted for the least largest
 * relative error on that interval (1.1e-7 in exact arithmetic; within 2 ulp
 * of expf in float, like Cephes' degree-5 q it replaces, which spent two more
 * multiply-adds in the cell's longest chain: the cell 12% faster). Inline
 * because a call to glibc's vector expf clobbers every vector register, and
 * with five exponentials per element the cell spent most of its time there
 * (0.25 -> 0.11 ms a layer of 1024 x 128); the clamp also keeps off the slow
 * path that glibc takes for lanes that overflow.
 */
static inline float sl_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 8.3125233930e-3f;
    p = p * r + 4.1890114068e-2f;
    p = p * r + 1.6667114484e-1f;
    p = p * r + 4.9999231785e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sl_sigmoid(float x) { return 1.0f / (1.0f + sl_exp(-x)); }

/*
 * A stream's rows lie anywhere in the store, so the hardware prefetcher
 * cannot see the next one coming; the loops fetch the rows of the slot this
 * many rows ahead themselves (at 10k streams: cell 0.36 -> 0.2 ms a layer).
 */
#define SL_AHEAD 4

static inline void sl_prefetch_read(const float *row, int64_t width) {
    for (int64_t j = 0; j < width; j += 16) __builtin_prefetch(row + j, 0);
}

static inline void sl_prefetch_write(const float *row, int64_t width) {
    for (int64_t j = 0; j < width; j += 16) __builtin_prefetch(row + j, 1);
}

/*
 * Row i of dst (rows ld apart) gets x[i, :xw] at column 0 when x is not NULL
 * (the layer's input) and src[slots[i], :width] at column off (its h); on
 * `threads` threads where the batch is worth it.
 */
void sl_gather(const float *src, const int64_t *slots, int64_t n, int64_t width, float *dst,
               int64_t ld, int64_t off, const float *x, int64_t xw, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (threads > 1 && n * width > SL_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        if (i + SL_AHEAD < n) sl_prefetch_read(src + slots[i + SL_AHEAD] * width, width);
        if (x != NULL) memcpy(dst + i * ld, x + i * xw, (size_t)xw * sizeof(float));
        memcpy(dst + i * ld + off, src + slots[i] * width, (size_t)width * sizeof(float));
    }
}

/*
 * The cell for one row: gates g [4H] are x W_ih^T + h W_hh^T in PyTorch's
 * order (i, f, g, o); bias [4H] is b_ih + b_hh, added here rather than by the
 * matrix product, which saves that product a pass over the gates.
 * c = f * c + i * g and h = o * tanh(c) are written to c, h (the store's row)
 * and h also to o.
 */
/* Always inlined: an out-of-line copy would be built for baseline x86-64 only. */
static inline __attribute__((always_inline)) void
sl_cell_row(const float *g, const float *bias, int64_t hidden, float *c, float *h, float *o) {
#pragma omp simd
    for (int64_t j = 0; j < hidden; j++) {
        float in_gate = sl_sigmoid(g[j] + bias[j]);
        float forget = sl_sigmoid(g[hidden + j] + bias[hidden + j]);
        float cand = 2.0f * sl_sigmoid(2.0f * (g[2 * hidden + j] + bias[2 * hidden + j])) - 1.0f;
        float out_gate = sl_sigmoid(g[3 * hidden + j] + bias[3 * hidden + j]);
        float cell = forget * c[j] + in_gate * cand;
        float hid = out_gate * (2.0f * sl_sigmoid(2.0f * cell) - 1.0f);
        c[j] = cell;
        h[j] = hid;
        o[j] = hid;
    }
}

/*
 * The GRU cell for one row: g [4H] holds, as sl_gates writes them, r and z (over
 * [x, h]), then the n gate's hidden part W_hn h and input part W_in x apart; bias
 * [4H] is b_ir + b_hr, b_iz + b_hz, b_hn, b_in (LayerWeights.fused's). As torch's
 * nn.GRU: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h,
 * written to h (the store's row, read before it is written) and to o.
 */
static inline __attribute__((always_inline)) void
sl_gru_row(const float *g, const float *bias, int64_t hidden, float *h, float *o) {
#pragma omp simd
    for (int64_t j = 0; j < hidden; j++) {
        float reset = sl_sigmoid(g[j] + bias[j]);
        float update = sl_sigmoid(g[hidden + j] + bias[hidden + j]);
        float n_h = g[2 * hidden + j] + bias[2 * hidden + j];
        float pre = g[3 * hidden + j] + bias[3 * hidden + j] + reset * n_h;
        float cand = 2.0f * sl_sigmoid(2.0f * pre) - 1.0f;
        float hid = (1.0f - update) * cand + update * h[j];
        h[j] = hid;
        o[j] = hid;
    }
}

/* The plain RNN cell (nn.RNN, tanh) for one row: h' = tanh(g + bias), g [H] being
 * x W_ih^T + h W_hh^T and bias b_ih + b_hh; to h and o. */
static inline __attribute__((always_inline)) void
sl_rnn_row(const float *g, const float *bias, int64_t hidden, float *h, float *o) {
#pragma omp simd
    for (int64_t j = 0; j < hidden; j++) {
        float hid = 2.0f * sl_sigmoid(2.0f * (g[j] + bias[j])) - 1.0f;
        h[j] = hid;
        o[j] = hid;
    }
}

/* The cells a model's layers are made of (sl_model.cell, kernels._CELLS). */
enum { SL_CELL_LSTM = 0, SL_CELL_GRU = 1, SL_CELL_RNN = 2 };

/* Columns of a layer's gates: 4H for an LSTM and a GRU (r, z, n_h, n_x), H for an RNN. */
static inline int64_t sl_gate_width(int64_t cell, int64_t hidden) {
    return cell == SL_CELL_RNN ? hidden : 4 * hidden;
}

/* One row of a layer of `cell`: c is the store's c row (an LSTM's; unused otherwise). */
static inline __attribute__((always_inline)) void
sl_row(int64_t cell, const float *g, const float *bias, int64_t hidden, float *c, float *h,
       float *o) {
    if (cell == SL_CELL_LSTM) sl_cell_row(g, bias, hidden, c, h, o);
    else if (cell == SL_CELL_GRU) sl_gru_row(g, bias, hidden, h, o);
    else sl_rnn_row(g, bias, hidden, h, o);
}

/*
 * One cell of `cell` for n distinct slots: gates [n, sl_gate_width], the store's
 * h [capacity, H] (and an LSTM's c; NULL otherwise) updated at slots[i], the new h
 * also to out[i, :H] (rows ld apart); on `threads` threads where the batch is worth it.
 */
SL_CLONES void sl_cell(int64_t cell, const float *gates, const float *bias, const int64_t *slots,
                       int64_t n, int64_t hidden, float *hs, float *cs, float *out, int64_t ld,
                       int threads) {
    int64_t gw = sl_gate_width(cell, hidden);
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (threads > 1 && n * hidden > SL_PARALLEL_MIN)
    for (int64_t r = 0; r < n; r++) {
        if (r + SL_AHEAD < n) {
            if (cs != NULL) sl_prefetch_read(cs + slots[r + SL_AHEAD] * hidden, hidden);
            sl_prefetch_write(hs + slots[r + SL_AHEAD] * hidden, hidden);
        }
        sl_row(cell, gates + r * gw, bias, hidden, cs != NULL ? cs + slots[r] * hidden : NULL,
               hs + slots[r] * hidden, out + r * ld);
    }
}

/* Matrix products run over whole blocks of this many rows (kernels.ROW_BLOCK says why). */
#define SL_ROW_BLOCK 24

/* rows rounded up to whole blocks of SL_ROW_BLOCK (at least one). */
static inline int64_t sl_whole_blocks(int64_t rows) {
    if (rows < 1) rows = 1;
    return (rows + SL_ROW_BLOCK - 1) / SL_ROW_BLOCK * SL_ROW_BLOCK;
}

/* The model as sl_step takes it; kernels.py fills it in once (ctypes). */
typedef struct {
    int64_t layers;
    const int64_t *hidden;         /* H_l */
    const int64_t *widths;         /* F_l + H_l */
    const float *const *weights;   /* [F_l + H_l, K_l] row-major, LayerWeights.fused's: K_l
                                      is sl_gate_width but a GRU's (sl_gates) */
    const float *const *bias;      /* [sl_gate_width], LayerWeights.fused's */
    int64_t head_layers;           /* 0: no head here, the caller runs it */
    const int64_t *head_widths;    /* each head linear's outputs */
    const float *const *head_weights; /* [in, out] row-major */
    const float *const *head_bias;
    const int64_t *head_act;       /* SL_ACT_* after each linear */
    int64_t per_row;               /* floats of scratch per row of a chunk */
    int64_t cell;                  /* SL_CELL_*: every layer's */
    /* A GRU's (NULL for another cell), LayerWeights.gru_apart's: W_hn^T [H_l, H_l] (NULL
     * where the n_h block is columns of weights[l]) and W_in^T [F_l, H_l]. */
    const float *const *n_h_weights;
    const float *const *n_x_weights;
} sl_model;

enum { SL_ACT_NONE = 0, SL_ACT_RELU = 1, SL_ACT_TANH = 2, SL_ACT_SIGMOID = 3 };

/* Row-major out [m, n] = in [m, k] W [k, n]. */
static inline void sl_mm(int m, int n, int k, const float *in, int ldi, const float *w, float *out,
                         int ldo) {
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, in, ldi, w, n,
                      0.0f, out, ldo);
}

/*
 * A layer's gate sums for m rows of xh ([x, h], F + H wide) into gates (rows
 * sl_gate_width apart), bias not added. An LSTM's and an RNN's: one product.
 * A GRU's blocks r, z, n_h, n_x: r and z over [x, h]; n_x over x alone, a
 * product of its own (F columns of the input; F = 1 for the default model,
 * where that product is a column times a row); n_h over h alone, either H
 * more columns of the [x, h] product with zero rows for x or, where x is wide
 * (LayerWeights.n_h_apart says when), a product of its own. So a GRU layer
 * multiplies what nn.GRU's two products do but for the F H zeros of a joined
 * n_h; a single product of 4H columns over [x, h] (zero blocks for both n
 * parts) cost the default model a third more (0.65 -> 0.50 ms a chunk of 256
 * rows for its two layers, one thread). Each product sums a row's terms in an
 * order set by its k alone, as the one product did (see sl_step).
 */
static inline void sl_gates(const sl_model *md, int64_t l, int m, const float *xh,
                            float *gates) {
    int hid = (int)md->hidden[l], width = (int)md->widths[l], xw = width - hid;
    int gw = (int)sl_gate_width(md->cell, hid);
    if (md->cell != SL_CELL_GRU) {
        sl_mm(m, gw, width, xh, width, md->weights[l], gates, gw);
        return;
    }
    const float *n_h = md->n_h_weights[l];
    sl_mm(m, (n_h != NULL ? 2 : 3) * hid, width, xh, width, md->weights[l], gates, gw);
    if (n_h != NULL) sl_mm(m, hid, hid, xh + xw, width, n_h, gates + 2 * hid, gw);
    sl_mm(m, hid, xw, xh, width, md->n_x_weights[l], gates + 3 * hid, gw);
}

/*
 * Row-major out [m, n] = in [m, k] W [k, n] for a narrow n, by plain dot
 * products: a BLAS's path for a product with one or a few columns (a head's
 * output layer) may sum a row differently with the number of rows, which would
 * make a stream's prediction depend on what else shares its batch.
 */
static inline __attribute__((always_inline)) void sl_mm_narrow(int64_t m, int64_t n, int64_t k,
                                                               const float *in, const float *w,
                                                               float *out) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float sum = 0.0f;
            for (int64_t t = 0; t < k; t++) sum += in[i * k + t] * w[t * n + j];
            out[i * n + j] = sum;
        }
}

/* Outputs below this many columns go through sl_mm_narrow. */
#define SL_NARROW 16

/* out[i, :w] = act(out[i, :w] + bias) for m rows, ld apart. */
static inline __attribute__((always_inline)) void
sl_bias_act(float *out, int64_t m, int64_t w, int64_t ld, const float *bias, int64_t act) {
    for (int64_t i = 0; i < m; i++) {
        float *o = out + i * ld;
#pragma omp simd
        for (int64_t j = 0; j < w; j++) {
            float v = o[j] + bias[j];
            if (act == SL_ACT_RELU) v = v > 0.0f ? v : 0.0f;
            else if (act == SL_ACT_TANH) v = 2.0f * sl_sigmoid(2.0f * v) - 1.0f;
            else if (act == SL_ACT_SIGMOID) v = sl_sigmoid(v);
            o[j] = v;
        }
    }
}

/*
 * Rows start .. start + m - 1 through every layer and the head (see sl_step);
 * xh is the thread's scratch area. inner: called outside any parallel region,
 * so the gather and the cell share their rows out among that many threads
 * (their own parallel loops: the outlined body of a loop here would not be
 * cloned for the instruction set); 0: inside one, rows in turn. Never more
 * threads than the step was given: a team beyond it (OpenMP's default is
 * every CPU) spins between steps, and on the daemon's 2 cores that took a
 * core from the broker and the event loop (the engine child measured 9.6 CPU
 * us a tick where its steps took 2.6).
 */
static inline __attribute__((always_inline)) void
sl_chunk(const sl_model *md, float *const *hs, float *const *cs, const int64_t *slots,
         const float *x, float *top, float *y, float *xh, int64_t rows, int64_t start, int64_t m,
         int inner) {
    int gm = (int)sl_whole_blocks(m); /* the products' rows: m, padded to whole blocks */
    int64_t xw = md->widths[0] - md->hidden[0];
    int64_t layers = md->layers, top_h = md->hidden[layers - 1];
    const int64_t *ks = slots + start;
    float *gates = xh;
    for (int64_t l = 0; l < layers; l++) gates += rows * md->widths[l];
    for (int64_t l = 0; l < layers; l++) {
        int64_t hid = md->hidden[l], width = md->widths[l], cell = md->cell;
        int64_t gw = sl_gate_width(cell, hid);
        float *hl = hs[l], *cl = cell == SL_CELL_LSTM ? cs[l] : NULL;
        if (inner)
            sl_gather(hl, ks, m, hid, xh, width, width - hid, l ? NULL : x + start * xw, xw,
                      inner);
        else
            for (int64_t i = 0; i < m; i++) {
                if (l == 0)
                    memcpy(xh + i * width, x + (start + i) * xw, (size_t)xw * sizeof(float));
                if (i + SL_AHEAD < m) sl_prefetch_read(hl + ks[i + SL_AHEAD] * hid, hid);
                memcpy(xh + i * width + width - hid, hl + ks[i] * hid, (size_t)hid * sizeof(float));
            }
        sl_gates(md, l, gm, xh, gates);
        int last = l + 1 == layers;
        float *next = last ? top + start * hid : xh + rows * width;
        int64_t ld = last ? hid : md->widths[l + 1];
        if (inner)
            sl_cell(cell, gates, md->bias[l], ks, m, hid, hl, cl, next, ld, inner);
        else
            for (int64_t i = 0; i < m; i++) {
                if (i + SL_AHEAD < m) {
                    if (cl != NULL) sl_prefetch_read(cl + ks[i + SL_AHEAD] * hid, hid);
                    sl_prefetch_write(hl + ks[i + SL_AHEAD] * hid, hid);
                }
                sl_row(cell, gates + i * gw, md->bias[l], hid, cl != NULL ? cl + ks[i] * hid : NULL,
                       hl + ks[i] * hid, next + i * ld);
            }
        xh = next;
    }
    /* The head: hidden linears take turns in two halves of the gates' area, the last y. */
    const float *in = top + start * top_h;
    int64_t in_w = top_h, half = 0;
    for (int64_t j = 0; j < md->head_layers; j++)
        half = md->head_widths[j] > half ? md->head_widths[j] : half;
    half *= rows;
    for (int64_t j = 0; j < md->head_layers; j++) {
        int64_t w = md->head_widths[j];
        float *out = j + 1 == md->head_layers ? y + start * w : gates + (j % 2) * half;
        if (w < SL_NARROW)
            sl_mm_narrow(m, w, in_w, in, md->head_weights[j], out);
        else
            sl_mm(gm, (int)w, (int)in_w, in, (int)in_w, md->head_weights[j], out, (int)w);
        sl_bias_act(out, m, w, w, md->head_bias[j], md->head_act[j]);
        in = out;
        in_w = w;
    }
}

/*
 * The whole recurrent step and the head, chunk by chunk: each thread takes
 * chunks of at most `chunk` rows and runs every layer on them (gather h, the
 * gate product through a single-threaded cblas_sgemm, the cell: LSTM, GRU or
 * RNN, sl_model.cell; only an LSTM has a c to read and write), then the head,
 * before its next chunk.
 *
 * Why: layer by layer over the whole batch, the thread pool forks and joins
 * for every product and cell, a thread that the OS puts off holds up the
 * other at each join, and the gates of 1024 rows (2 MB) leave the core's L2
 * between the product that writes them and the cell that reads them. A
 * chunk's rows stay in L2 from gather to head, the threads meet once a step,
 * and chunks go to whichever thread is free (at 10k streams, 7% less time a
 * step than layer by layer, and far less when another process takes a core).
 *
 * x [n, F] is the first layer's input; the top layer's new h goes to top
 * [n, H_top] and, with a head, its outputs to y [n, O]; both hold n rounded
 * up to whole blocks of SL_ROW_BLOCK rows. work holds `threads` scratch areas
 * of chunk * md->per_row floats (chunk: at least SL_ROW_BLOCK): per layer
 * [chunk, F_l + H_l] for [x, h], then the gates [chunk, max gate width], where
 * the head's hidden linears take turns in two halves.
 *
 * Every product runs over whole blocks of SL_ROW_BLOCK rows, so that a row's
 * result does not depend on its chunk or on how many rows share its batch. A
 * BLAS's sgemm takes the rows in groups and the rows of a last, partial group
 * through other code, which may sum a row's terms in another order: OpenBLAS's
 * Haswell kernel (AVX2 machines, Zen included) groups them by 12, and a stream
 * that moved between a whole group and a partial one differed in the last bit.
 * So each chunk but the last holds whole blocks (the rows are split into
 * chunks of equal whole blocks), and the last is padded to whole blocks: its
 * padding rows are finite leftovers of the scratch, top and y (whose rows past
 * n are there for it), computed and ignored. 24 is a multiple of the Haswell
 * kernel's 12 and of 8; the SkylakeX kernel (AVX-512) gave the same bits for
 * any number of rows. tests/streamlstm/test_chunked_step.py checks a stream's
 * bits for 1 to 1600 rows on the machine it runs on.
 */
SL_CLONES void sl_step(const sl_model *md, float *const *hs, float *const *cs,
                       const int64_t *slots, int64_t n, const float *x, float *top, float *y,
                       float *work, int64_t threads, int64_t chunk) {
    if (n <= 0) return;
    /* Chunk k is rows k per .. (k + 1) per - 1, per a whole number of blocks no more
     * than the scratch's rows; only the last chunk can end short of whole blocks. */
    if (chunk < SL_ROW_BLOCK) chunk = SL_ROW_BLOCK; /* the caller allocates at least this */
    int64_t rows = chunk, most = chunk - chunk % SL_ROW_BLOCK;
    int64_t chunks = (n + most - 1) / most;
    int64_t per = sl_whole_blocks((n + chunks - 1) / chunks);
    chunks = (n + per - 1) / per;
    int team = threads > 1 ? (int)threads : 1; /* the gather's and the cell's, below */
    if (threads > chunks) threads = chunks;
    if (threads <= 1) {
        /*
         * Not even a team of one: libgomp starts fresh threads for a parallel
         * region nested in another (the gather's and the cell's), on every call.
         */
        for (int64_t k = 0; k < chunks; k++)
            sl_chunk(md, hs, cs, slots, x, top, y, work, rows, k * per,
                     k + 1 < chunks ? per : n - k * per, team);
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t k = 0; k < chunks; k++) {
#ifdef _OPENMP
        float *xh = work + (int64_t)omp_get_thread_num() * rows * md->per_row;
#else
        float *xh = work;
#endif
        sl_chunk(md, hs, cs, slots, x, top, y, xh, rows, k * per, k + 1 < chunks ? per : n - k * per,
                 0);
    }
}

/*
 * SlotMap: the store's stream id -> slot map, an open-addressing hash table
 * (linear probing, deletion by backward shift) of exact-str keys.
 *
 * Why: looking a batch of ids up in a dict misses cache three or four times
 * per id, one miss after another, once the matrix products have evicted the
 * map (0.37 ms per 1024 ids at 10k streams, a tenth of a step). lookup() goes
 * through a batch in stages and prefetches what each next stage reads (the id
 * objects, then their buckets, then the stored keys where the pointers
 * differ), so the misses of many ids overlap.
 */
typedef struct {
    Py_hash_t hash;
    PyObject *key; /* NULL: empty bucket */
    int32_t slot;
    uint32_t seen; /* the lookup() call that last found this key (its epoch) */
} sl_bucket;

typedef struct {
    PyObject_HEAD
    sl_bucket *table;
    Py_ssize_t mask; /* buckets - 1, a power of two minus one */
    Py_ssize_t used;
    uint32_t epoch; /* lookup() calls so far, wrapping past 0 */
} SlotMapObject;

#define SL_MIN_BUCKETS 64
#define SL_CHUNK 64

static int sl_keys_equal(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    Py_ssize_t len = PyUnicode_GET_LENGTH(a);
    if (len != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b)) return 0;
    return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)len * PyUnicode_KIND(a)) == 0;
}

/*
 * The hash of a key, or -1 for anything that is not a str. Keys are compared
 * by their text, so a str subclass (numpy.str_) finds the same slot as str.
 */
static Py_hash_t sl_hash(PyObject *key) {
    /* str's own hash (cached in the object), never fails; not a subclass's __hash__. */
    return PyUnicode_Check(key) ? PyUnicode_Type.tp_hash(key) : -1;
}

/* The bucket holding key, or the empty bucket where it would go, probing from i. */
static Py_ssize_t sl_probe(SlotMapObject *self, PyObject *key, Py_hash_t hash, Py_ssize_t i) {
    for (;;) {
        sl_bucket *b = &self->table[i];
        if (b->key == NULL || (b->hash == hash && sl_keys_equal(b->key, key))) return i;
        i = (i + 1) & self->mask;
    }
}

static inline Py_ssize_t sl_home(SlotMapObject *self, Py_hash_t hash) {
    return (Py_ssize_t)((size_t)hash & (size_t)self->mask);
}

static Py_ssize_t sl_find(SlotMapObject *self, PyObject *key, Py_hash_t hash) {
    return sl_probe(self, key, hash, sl_home(self, hash));
}

static int sl_resize(SlotMapObject *self, Py_ssize_t buckets) {
    sl_bucket *old = self->table;
    Py_ssize_t old_buckets = old ? self->mask + 1 : 0;
    sl_bucket *table = PyMem_Calloc((size_t)buckets, sizeof(sl_bucket));
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->table = table;
    self->mask = buckets - 1;
    for (Py_ssize_t j = 0; j < old_buckets; j++) {
        if (old[j].key == NULL) continue;
        Py_ssize_t i = sl_home(self, old[j].hash);
        while (table[i].key != NULL) i = (i + 1) & self->mask;
        table[i] = old[j];
    }
    PyMem_Free(old);
    return 0;
}

static PyObject *SlotMap_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "SlotMap() takes no arguments");
        return NULL;
    }
    SlotMapObject *self = (SlotMapObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    if (sl_resize(self, SL_MIN_BUCKETS) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void SlotMap_dealloc(SlotMapObject *self) {
    if (self->table != NULL) {
        for (Py_ssize_t j = 0; j <= self->mask; j++) Py_XDECREF(self->table[j].key);
        PyMem_Free(self->table);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t SlotMap_len(SlotMapObject *self) { return self->used; }

static int SlotMap_contains(SlotMapObject *self, PyObject *key) {
    Py_hash_t hash = sl_hash(key);
    if (hash == -1) return 0;
    return self->table[sl_find(self, key, hash)].key != NULL;
}

static PyObject *SlotMap_subscript(SlotMapObject *self, PyObject *key) {
    Py_hash_t hash = sl_hash(key);
    if (hash != -1) {
        sl_bucket *b = &self->table[sl_find(self, key, hash)];
        if (b->key != NULL) return PyLong_FromLongLong(b->slot);
    }
    PyErr_SetObject(PyExc_KeyError, key);
    return NULL;
}

static int sl_delete(SlotMapObject *self, PyObject *key) {
    Py_hash_t hash = sl_hash(key);
    Py_ssize_t i = hash == -1 ? -1 : sl_find(self, key, hash);
    if (i < 0 || self->table[i].key == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    PyObject *old = self->table[i].key;
    /* Backward shift: pull later entries of the probe run into the hole. */
    Py_ssize_t hole = i, j = i;
    for (;;) {
        j = (j + 1) & self->mask;
        sl_bucket *b = &self->table[j];
        if (b->key == NULL) break;
        Py_ssize_t home = sl_home(self, b->hash);
        /* Movable unless its home lies cyclically in (hole, j]. */
        if (((j - home) & self->mask) >= ((j - hole) & self->mask)) {
            self->table[hole] = *b;
            hole = j;
        }
    }
    self->table[hole].key = NULL;
    self->used--;
    Py_DECREF(old);
    return 0;
}

static int SlotMap_ass_subscript(SlotMapObject *self, PyObject *key, PyObject *value) {
    if (value == NULL) return sl_delete(self, key);
    if (!PyUnicode_Check(key)) {
        PyErr_Format(PyExc_TypeError, "SlotMap keys are str, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
    long long slot = PyLong_AsLongLong(value);
    if (slot == -1 && PyErr_Occurred()) return -1;
    if (slot < 0 || slot > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "SlotMap values are slots, 0 <= slot < 2**31");
        return -1;
    }
    Py_hash_t hash = sl_hash(key);
    Py_ssize_t i = sl_find(self, key, hash);
    sl_bucket *b = &self->table[i];
    if (b->key != NULL) {
        b->slot = (int32_t)slot;
        return 0;
    }
    /* A subclass instance is stored as a plain str copy. */
    PyObject *stored = PyUnicode_CheckExact(key) ? Py_NewRef(key) : PyUnicode_FromObject(key);
    if (stored == NULL) return -1;
    b->hash = hash;
    b->key = stored;
    b->slot = (int32_t)slot;
    b->seen = 0;
    self->used++;
    if (2 * self->used > self->mask + 1) return sl_resize(self, 2 * (self->mask + 1));
    return 0;
}

static PyObject *SlotMap_get(SlotMapObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    Py_hash_t hash = sl_hash(args[0]);
    if (hash != -1) {
        sl_bucket *b = &self->table[sl_find(self, args[0], hash)];
        if (b->key != NULL) return PyLong_FromLongLong(b->slot);
    }
    PyObject *dflt = nargs == 2 ? args[1] : Py_None;
    Py_INCREF(dflt);
    return dflt;
}

/*
 * lookup(ids, out): out[i] = the slot of ids[i], or -1. ids is a list or a
 * tuple; out a writable, C-contiguous int64 buffer of len(ids) items.
 * Returns whether there are ids, every one held and none twice: each found bucket is
 * stamped with the call's epoch, so a repeat shows as a bucket stamped
 * already, while the bucket is in cache anyway (the engine used to sort the
 * slots to learn this, 25 us a batch of 1024).
 */
static PyObject *SlotMap_lookup(SlotMapObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lookup(ids, out)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "lookup: ids must be a sequence");
    if (seq == NULL) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (view.itemsize != 8 || view.len != n * 8 || view.format == NULL ||
        strchr("qlQL", view.format[0]) == NULL || view.format[1] != '\0') {
        PyBuffer_Release(&view);
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "lookup: out must be int64 with one item per id");
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int64_t *out = view.buf;
    if (++self->epoch == 0) { /* wrapped: no bucket may keep an old stamp */
        for (Py_ssize_t j = 0; j <= self->mask; j++) self->table[j].seen = 0;
        self->epoch = 1;
    }
    uint32_t epoch = self->epoch;
    int distinct = 1;
    Py_hash_t hashes[SL_CHUNK];
    Py_ssize_t at[SL_CHUNK];
    for (Py_ssize_t i = 0; i < n && i < SL_CHUNK; i++) __builtin_prefetch(items[i]);
    for (Py_ssize_t start = 0; start < n; start += SL_CHUNK) {
        Py_ssize_t m = n - start < SL_CHUNK ? n - start : SL_CHUNK;
        PyObject **ids = items + start;
        for (Py_ssize_t i = start + SL_CHUNK; i < n && i < start + 2 * SL_CHUNK; i++)
            __builtin_prefetch(items[i]);
        for (Py_ssize_t k = 0; k < m; k++) {
            hashes[k] = sl_hash(ids[k]);
            at[k] = sl_home(self, hashes[k]);
            if (hashes[k] != -1) __builtin_prefetch(&self->table[at[k]]);
        }
        /* Skip buckets of other hashes; prefetch a stored key that must be compared. */
        for (Py_ssize_t k = 0; k < m; k++) {
            if (hashes[k] == -1) continue; /* not a str: not held */
            Py_ssize_t i = at[k];
            while (self->table[i].key != NULL && self->table[i].hash != hashes[k])
                i = (i + 1) & self->mask;
            at[k] = i;
            if (self->table[i].key != NULL && self->table[i].key != ids[k])
                __builtin_prefetch(self->table[i].key);
        }
        for (Py_ssize_t k = 0; k < m; k++) {
            Py_ssize_t i = hashes[k] == -1 ? -1 : sl_probe(self, ids[k], hashes[k], at[k]);
            sl_bucket *b = i >= 0 && self->table[i].key != NULL ? &self->table[i] : NULL;
            if (b == NULL) {
                out[start + k] = -1;
                distinct = 0;
                continue;
            }
            out[start + k] = b->slot;
            if (b->seen == epoch) distinct = 0;
            b->seen = epoch;
        }
    }
    PyBuffer_Release(&view);
    Py_DECREF(seq);
    return PyBool_FromLong(distinct && n > 0);
}

static PyObject *SlotMap_sizeof(SlotMapObject *self, PyObject *Py_UNUSED(ignored)) {
    size_t size = sizeof(SlotMapObject) + (size_t)(self->mask + 1) * sizeof(sl_bucket);
    return PyLong_FromSize_t(size);
}

static PyMethodDef SlotMap_methods[] = {
    {"get", (PyCFunction)(void (*)(void))SlotMap_get, METH_FASTCALL,
     "get(key, default=None): the slot of key, or default."},
    {"lookup", (PyCFunction)(void (*)(void))SlotMap_lookup, METH_FASTCALL,
     "lookup(ids, out): out[i] = the slot of ids[i], or -1 (out: int64 buffer); "
     "returns whether every id is held and none repeats."},
    {"__sizeof__", (PyCFunction)SlotMap_sizeof, METH_NOARGS, "Bytes held by the map."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods SlotMap_as_sequence = {
    .sq_contains = (objobjproc)SlotMap_contains,
};

static PyMappingMethods SlotMap_as_mapping = {
    .mp_length = (lenfunc)SlotMap_len,
    .mp_subscript = (binaryfunc)SlotMap_subscript,
    .mp_ass_subscript = (objobjargproc)SlotMap_ass_subscript,
};

static PyTypeObject SlotMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "streamlstm._kernels.SlotMap",
    .tp_doc = "Stream id (str) -> slot (int >= 0), with a batched lookup.",
    .tp_basicsize = sizeof(SlotMapObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = SlotMap_new,
    .tp_dealloc = (destructor)SlotMap_dealloc,
    .tp_methods = SlotMap_methods,
    .tp_as_sequence = &SlotMap_as_sequence,
    .tp_as_mapping = &SlotMap_as_mapping,
};

/* The daemon's codec is a module of its own (_codec.c), built without -ffast-math. */
static struct PyModuleDef sl_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                       "C kernels of the engine (called through ctypes) "
                                       "and the store's SlotMap.",
                                       -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    if (PyType_Ready(&SlotMapType) < 0) return NULL;
    /* sl_step runs its products on its own threads, one chunk each: OpenBLAS's
     * own threads would only contend with them. */
    scipy_openblas_set_num_threads(1);
    PyObject *module = PyModule_Create(&sl_module);
    if (module == NULL) return NULL;
    Py_INCREF(&SlotMapType);
    if (PyModule_AddObject(module, "SlotMap", (PyObject *)&SlotMapType) < 0) {
        Py_DECREF(&SlotMapType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
