/*
 * Live quality's per-tick update of the realized forecast errors, the
 * extension module streamlstm._quality (loaded by streamlstm.quality.native,
 * called through ctypes; it touches no Python objects).
 *
 * Why: RealizedErrors.update in NumPy is some forty array operations on a
 * round of ticks (gather the streams' rows, pair each forecast with its
 * truth, mask the pairs a hole or a reset broke, tally the errors, follow
 * each stream's recent error, scatter the rows back): about 0.26 ms of a
 * 2.3 ms step of 1024 ticks at 10k streams, most of it per-operation
 * overhead and passes over temporaries (caches cold, as the step's products
 * leave them). Here it is one pass over the rows, each stream's columns read
 * and written in place: about 60 us.
 *
 * It computes exactly what the NumPy path (errors.py, report.py) computes,
 * bit for bit: the same float64 operations in the same order, the tallies'
 * sums added in row order (the NumPy path sums with np.cumsum, which is
 * sequential, for that reason). So it is a module of its own, built without
 * the kernels' -ffast-math (which lets the compiler assume no NaN, and NaN
 * marks an error not judged) and with -ffp-contract=off (a fused
 * multiply-add rounds once where NumPy rounds twice).
 *
 * Every slot is checked against the store's capacity before anything is
 * written; `make test-sanitize` runs the quality tests against an ASan/UBSan
 * build.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>

/* RealizedErrors tracks at most two horizons (the model's, and H of a
 * multi-horizon model), each against at most two baselines (persistence,
 * seasonal persistence); errors.py checks it before it uses this. */
#define SLQ_MAX_TRACKED 2
#define SLQ_MAX_ROWS 3 /* the model's errors, then each baseline's */

/* Rows fetched ahead: the streams' rows are scattered over the store, which the
 * step's matrix products have just pushed out of cache; reading them one by
 * one waits for memory on every row. Measured as for slq_bucket: 58-68 us a
 * round with rows fetched 16 ahead, 122-139 us without. */
#define SLQ_AHEAD 16

/* One tracked horizon: its forecast ring and the tallies of its errors. */
typedef struct {
    int64_t output;  /* the forecast's column in forecasts [n, outputs] */
    int64_t horizon; /* h: the ring holds the last h forecasts */
    int64_t ring;    /* the ring's first column, relative to the base */
    int64_t lags;    /* how many baselines */
    int64_t lag[SLQ_MAX_ROWS - 1];
    int64_t buckets;       /* bounds, the last +inf */
    const double *bounds;  /* [buckets], ascending */
    int64_t *counts;       /* [1 + lags, buckets], values per bucket (added to) */
    double *sums;          /* [1 + lags, 2]: sum, sum of squares (added to) */
} slq_horizon;

typedef struct {
    int64_t base;    /* the first column (the start) in a row of extra */
    int64_t levels;  /* the ring of target values, columns base + 1 .. */
    int64_t recent;  /* the recent errors' two columns, relative to the base */
    int64_t tracked; /* horizons in use */
    double alpha;    /* the recent errors' weight of a new error */
    slq_horizon horizon[SLQ_MAX_TRACKED];
} slq_spec;

/* Python's (and NumPy's) modulo for a positive m: never negative. Rings of
 * one column (h = 1, the common case) skip the division. */
static inline int64_t slq_mod(int64_t a, int64_t m) {
    if (m == 1) return 0;
    int64_t r = a % m;
    return r < 0 ? r + m : r;
}

/* Bucket of a non-NaN v: the first bound at or above it (a value equal to a
 * bound counts in it, as Prometheus' le), so the count of bounds below it; the
 * last bound is +inf. A binary search without branches (the loop's trips
 * depend on the number of bounds alone): where an error lands is random, so a
 * search that branches on it mispredicts on about every value. Measured at 10k
 * streams, rounds of 1024 rows in shuffled passes, caches flushed between
 * rounds: 75-79 us a round stopping a linear scan at the bucket, 58-70 us
 * scanning every bound, 56-64 us with this search. */
static inline int64_t slq_bucket(const slq_horizon *t, double v) {
    const double *first = t->bounds;
    int64_t n = t->buckets - 1; /* the finite bounds */
    if (n < 1) return 0;
    while (n > 1) {
        int64_t half = n / 2;
        first = first[half] < v ? first + half : first;
        n -= half;
    }
    return (first - t->bounds) + (*first < v);
}

/* One stream's errors for horizon t at step s: e[0] the model's, then each
 * baseline's, absolute; NaN where no forecast is judged. Writes the ring. */
static inline void slq_errors(const slq_horizon *t, double *row, const double *levels,
                              int64_t nlevels, int64_t s, double start, double truth,
                              double forecast, double *e) {
    double *ring = row + t->ring;
    int64_t h = t->horizon, where = slq_mod(s, h);
    e[0] = ring[where] - truth;
    for (int64_t k = 0; k < t->lags; k++) {
        int64_t lag = t->lag[k];
        e[k + 1] = levels[slq_mod(s - lag, nlevels)] - truth;
        /* A longer lag (a season) needs a longer history. */
        if (lag != h && (double)(s - lag) < start) e[k + 1] = NAN;
    }
    int paired = (double)(s - h) >= start;
    for (int64_t k = 0; k <= t->lags; k++) e[k] = paired ? fabs(e[k]) : NAN;
    ring[where] = forecast;
}

/* The stream's recent errors (model's, naive's) after this tick's, as
 * RealizedErrors._follow: unchanged where the model's is not judged, the
 * error itself at the first judged one, else an exponential average. */
static inline void slq_follow(double *recent, const double *e, double alpha, int first) {
    if (isnan(e[0])) return;
    for (int j = 0; j < 2; j++) {
        double moved = recent[j] + alpha * (e[j] - recent[j]);
        recent[j] = first ? e[j] : moved;
    }
}

/* Slots, step counts after this tick, target values and forecasts [n, outputs]
 * of one round of distinct streams; extra is the store's [capacity, width].
 * Returns 0, or -1 (nothing done) for a slot outside the store or a spec it
 * cannot take. */
int64_t slq_update(const slq_spec *sp, double *extra, int64_t capacity, int64_t width,
                   const int64_t *slots, const int64_t *steps, const float *values,
                   const float *forecasts, int64_t outputs, int64_t n) {
    if (sp->tracked < 1 || sp->tracked > SLQ_MAX_TRACKED || sp->levels < 1) return -1;
    for (int64_t t = 0; t < sp->tracked; t++) {
        const slq_horizon *hz = &sp->horizon[t];
        if (hz->lags < 1 || hz->lags > SLQ_MAX_ROWS - 1 || hz->horizon < 1 ||
            hz->output < 0 || hz->output >= outputs || hz->buckets < 1)
            return -1;
    }
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= capacity) return -1;
    /* Each call's sums start from zero and go to the totals at the end, in row
     * order: as the NumPy path's np.cumsum of the round's errors. */
    double sums[SLQ_MAX_TRACKED][SLQ_MAX_ROWS][2] = {{{0.0}}};
    int64_t span = 1 + sp->levels; /* the start and the levels: read before the rest */
    for (int64_t t = 0; t < sp->tracked; t++) {
        const slq_horizon *hz = &sp->horizon[t];
        if (hz->ring + hz->horizon > span) span = hz->ring + hz->horizon;
    }
    if (sp->recent + 2 > span) span = sp->recent + 2;
    for (int64_t i = 0; i < n; i++) {
        if (i + SLQ_AHEAD < n) {
            const double *ahead = extra + slots[i + SLQ_AHEAD] * width + sp->base;
            __builtin_prefetch(ahead, 1);
            __builtin_prefetch(ahead + span - 1, 1);
        }
        double *row = extra + slots[i] * width + sp->base;
        int64_t s = steps[i];
        /* A zero start (fresh, reset, or restored without these columns): this tick. */
        double start = row[0] == 0.0 ? (double)s : row[0];
        row[0] = start;
        double truth = (double)values[i];
        double *levels = row + 1;
        for (int64_t t = 0; t < sp->tracked; t++) {
            const slq_horizon *hz = &sp->horizon[t];
            double e[SLQ_MAX_ROWS];
            double forecast = (double)forecasts[i * outputs + hz->output];
            slq_errors(hz, row, levels, sp->levels, s, start, truth, forecast, e);
            for (int64_t k = 0; k <= hz->lags; k++) {
                if (isnan(e[k])) continue;
                hz->counts[k * hz->buckets + slq_bucket(hz, e[k])]++;
                double square = e[k] * e[k];
                sums[t][k][0] += e[k];
                sums[t][k][1] += square;
            }
            if (t == 0)
                slq_follow(row + sp->recent, e, sp->alpha, (double)(s - hz->horizon) == start);
        }
        levels[slq_mod(s, sp->levels)] = truth;
    }
    for (int64_t t = 0; t < sp->tracked; t++)
        for (int64_t k = 0; k <= sp->horizon[t].lags; k++) {
            sp->horizon[t].sums[2 * k] += sums[t][k][0];
            sp->horizon[t].sums[2 * k + 1] += sums[t][k][1];
        }
    return 0;
}

static struct PyModuleDef slq_module = {PyModuleDef_HEAD_INIT, "_quality",
                                        "Live quality's realized-error update "
                                        "(called through ctypes).",
                                        -1, NULL};

PyMODINIT_FUNC PyInit__quality(void) { return PyModule_Create(&slq_module); }
