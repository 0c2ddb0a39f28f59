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
 * calls the plain C functions (gather, cell) through ctypes, and they touch
 * no Python objects. The module also defines the store's SlotMap type
 * (below), which holds references to its str keys.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

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
 * and Cephes' degree-6 polynomial for e^r (within 2 ulp of expf). Inline
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
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
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
 * (the layer's input) and src[slots[i], :width] at column off (its h).
 */
void sl_gather(const float *src, const int64_t *slots, int64_t n, int64_t width, float *dst,
               int64_t ld, int64_t off, const float *x, int64_t xw) {
#pragma omp parallel for schedule(static) if (n * width > SL_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        if (i + SL_AHEAD < n) sl_prefetch_read(src + slots[i + SL_AHEAD] * width, width);
        if (x != NULL) memcpy(dst + i * ld, x + i * xw, (size_t)xw * sizeof(float));
        memcpy(dst + i * ld + off, src + slots[i] * width, (size_t)width * sizeof(float));
    }
}

/*
 * One LSTM cell for n distinct slots. gates [n, 4H] are x W_ih^T + h W_hh^T
 * in PyTorch's order (i, f, g, o); bias [4H] is b_ih + b_hh, added here
 * rather than by the matrix product, which saves that product a pass over
 * the gates. c = f * c + i * g and h = o * tanh(c) are written to the stores
 * h, c [capacity, H] at slots[i], and h also to out[i, :H] (rows ld apart).
 */
SL_CLONES void sl_lstm_cell(const float *gates, const float *bias, const int64_t *slots, int64_t n,
                            int64_t hidden, float *hs, float *cs, float *out, int64_t ld) {
#pragma omp parallel for schedule(static) if (n * hidden > SL_PARALLEL_MIN)
    for (int64_t r = 0; r < n; r++) {
        if (r + SL_AHEAD < n) {
            sl_prefetch_read(cs + slots[r + SL_AHEAD] * hidden, hidden);
            sl_prefetch_write(hs + slots[r + SL_AHEAD] * hidden, hidden);
        }
        const float *g = gates + r * 4 * hidden;
        float *c = cs + slots[r] * hidden;
        float *h = hs + slots[r] * hidden;
        float *o = out + r * ld;
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
    int64_t slot;
} sl_bucket;

typedef struct {
    PyObject_HEAD
    sl_bucket *table;
    Py_ssize_t mask; /* buckets - 1, a power of two minus one */
    Py_ssize_t used;
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
    if (slot < 0) {
        PyErr_SetString(PyExc_ValueError, "SlotMap values are slots, >= 0");
        return -1;
    }
    Py_hash_t hash = sl_hash(key);
    Py_ssize_t i = sl_find(self, key, hash);
    sl_bucket *b = &self->table[i];
    if (b->key != NULL) {
        b->slot = slot;
        return 0;
    }
    /* A subclass instance is stored as a plain str copy. */
    PyObject *stored = PyUnicode_CheckExact(key) ? Py_NewRef(key) : PyUnicode_FromObject(key);
    if (stored == NULL) return -1;
    b->hash = hash;
    b->key = stored;
    b->slot = slot;
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
            out[start + k] = i >= 0 && self->table[i].key != NULL ? self->table[i].slot : -1;
        }
    }
    PyBuffer_Release(&view);
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *SlotMap_sizeof(SlotMapObject *self, PyObject *Py_UNUSED(ignored)) {
    size_t size = sizeof(SlotMapObject) + (size_t)(self->mask + 1) * sizeof(sl_bucket);
    return PyLong_FromSize_t(size);
}

static PyMethodDef SlotMap_methods[] = {
    {"get", (PyCFunction)(void (*)(void))SlotMap_get, METH_FASTCALL,
     "get(key, default=None): the slot of key, or default."},
    {"lookup", (PyCFunction)(void (*)(void))SlotMap_lookup, METH_FASTCALL,
     "lookup(ids, out): out[i] = the slot of ids[i], or -1 (out: int64 buffer)."},
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

/* The daemon's per-poll decode and encode (_codec.c). */
extern PyMethodDef sl_codec_methods[];
int sl_codec_init(void);

static struct PyModuleDef sl_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                       "C kernels of the engine (called through ctypes), "
                                       "the store's SlotMap and the daemon's codec.",
                                       -1, sl_codec_methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    if (PyType_Ready(&SlotMapType) < 0 || sl_codec_init() < 0) return NULL;
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
