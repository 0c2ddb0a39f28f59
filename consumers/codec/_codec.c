/*
 * The daemon's per-poll wire work, the extension module streamlstm._codec
 * (loaded by streamlstm.kernels.codec_module): a poll's records to the step
 * request's arrays, and a step's results to output records, in one call each.
 *
 * Why: decoding a tick through orjson and the checks of wire.decode_tick,
 * and encoding a prediction through a dict and orjson.dumps, cost the
 * daemon's parent a few microseconds of CPU per tick, most of it building
 * Python objects that live for one poll.
 *
 * Neither function decides anything wire.py would decide differently: the
 * decoder accepts only a narrow, common shape of tick (an ASCII object with
 * the known fields, plain strings, numbers in range) and marks everything
 * else for wire.decode_tick, which gives the verdict and the reason; the
 * encoder writes only what it is sure orjson writes the same way (floats
 * whose repr is plain decimal) and leaves the rest to wire.encode_prediction.
 *
 * It reads untrusted bytes, so it is a module of its own, built without the
 * kernels' -ffast-math (under which the compiler may assume that no value is
 * NaN or infinite, and drop exactly the checks this file makes); `make
 * test-sanitize` runs its tests against an ASan/UBSan build. Every read of
 * input bytes is bounded by the cursor's end, every size product is checked,
 * and every array argument is checked for its type, size and alignment.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Below the smallest magnitude that float32 rounds to infinity (2^128 - 2^103,
 * about 3.4028e38): values from here up go to Python, which decides exactly. */
#define CODEC_F32_SAFE 3.0e38
/* A number token longer than this goes to Python (and strtod never sees it). */
#define CODEC_MAX_NUMBER 64

/* From the bits: right whatever floating-point flags the file is compiled with. */
static int codec_finite(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    return ((bits >> 52) & 0x7ff) != 0x7ff;
}

typedef struct {
    const char *p;
    const char *end;
} Cursor;

static void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

/* A JSON number, strictly by the grammar. *is_int: no fraction, no exponent. */
static int parse_number(Cursor *c, double *out, int *is_int) {
    const char *start = c->p, *p = c->p, *end = c->end;
    if (p < end && *p == '-') p++;
    if (p >= end) return 0;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return 0;
    }
    *is_int = 1;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return 0;
        while (p < end && *p >= '0' && *p <= '9') p++;
        *is_int = 0;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return 0;
        while (p < end && *p >= '0' && *p <= '9') p++;
        *is_int = 0;
    }
    Py_ssize_t len = p - start;
    if (len > CODEC_MAX_NUMBER) return 0;
    char buf[CODEC_MAX_NUMBER + 1];
    memcpy(buf, start, (size_t)len);
    buf[len] = '\0';
    char *stop = NULL;
    /* strtod rounds correctly (glibc), as float() of Python's int and orjson's float;
     * the locale's decimal point is never changed by Python. */
    double value = strtod(buf, &stop);
    if (stop != buf + len) return 0;
    if (*is_int) { /* float(-0) is 0.0: an int has no sign of zero (bits: see the top) */
        uint64_t bits;
        memcpy(&bits, &value, sizeof bits);
        if ((bits << 1) == 0) bits = 0;
        memcpy(&value, &bits, sizeof bits);
    }
    *out = value;
    c->p = p;
    return 1;
}

/* A string of printable ASCII without escapes; anything else is Python's to judge. */
static int parse_plain_string(Cursor *c, const char **s, Py_ssize_t *len) {
    if (c->p >= c->end || *c->p != '"') return 0;
    const char *start = ++c->p;
    while (c->p < c->end) {
        unsigned char ch = (unsigned char)*c->p;
        if (ch == '"') {
            *s = start;
            *len = c->p - start;
            c->p++;
            return 1;
        }
        if (ch < 0x20 || ch > 0x7e || ch == '\\') return 0;
        c->p++;
    }
    return 0;
}

static int match_literal(Cursor *c, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return 0;
    c->p += n;
    return 1;
}

/* true, false or null (null: -1). */
static int parse_flag(Cursor *c, int *flag) {
    if (match_literal(c, "true")) *flag = 1;
    else if (match_literal(c, "false")) *flag = 0;
    else if (match_literal(c, "null")) *flag = 0;
    else return 0;
    return 1;
}

static int value_in_range(double v) { return codec_finite(v) && fabs(v) < CODEC_F32_SAFE; }

enum { F_STREAM = 1, F_VALUES = 2, F_VALUE = 4, F_TS = 8, F_RESET = 16, F_END = 32 };

typedef struct {
    Py_ssize_t input_size, max_id;
    double min_ts, latest;
} Limits;

/* One tick's value; 1 when it is certainly one wire.decode_tick accepts (and with what). */
static int decode_one(const char *data, Py_ssize_t size, const char *key, Py_ssize_t key_len,
                      const Limits *lim, double *row, double *ts, uint8_t *flags,
                      const char **id, Py_ssize_t *id_len) {
    Cursor c = {data, data + size};
    const char *stream = NULL;
    Py_ssize_t stream_len = 0;
    int seen = 0, is_int = 0, flag = 0;
    *ts = NAN;
    *flags = 0;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{') return 0;
    c.p++;
    skip_ws(&c);
    for (;;) {
        const char *name;
        Py_ssize_t name_len;
        if (!parse_plain_string(&c, &name, &name_len)) return 0;
        skip_ws(&c);
        if (c.p >= c.end || *c.p != ':') return 0;
        c.p++;
        skip_ws(&c);
#define FIELD(text, bit) (name_len == (Py_ssize_t)sizeof(text) - 1 && \
                          memcmp(name, text, sizeof(text) - 1) == 0 && !(seen & (bit)) && \
                          (seen |= (bit)))
        if (FIELD("stream", F_STREAM)) {
            if (match_literal(&c, "null")) {
                stream = NULL;
            } else if (!parse_plain_string(&c, &stream, &stream_len) || stream_len == 0) {
                return 0;
            }
        } else if (FIELD("values", F_VALUES)) {
            if (c.p >= c.end || *c.p != '[') return 0;
            c.p++;
            skip_ws(&c);
            for (Py_ssize_t k = 0;; k++) {
                double v;
                if (k >= lim->input_size || !parse_number(&c, &v, &is_int) || !value_in_range(v))
                    return 0;
                row[k] = v;
                skip_ws(&c);
                if (c.p < c.end && *c.p == ',') {
                    c.p++;
                    skip_ws(&c);
                    continue;
                }
                if (c.p < c.end && *c.p == ']' && k + 1 == lim->input_size) {
                    c.p++;
                    break;
                }
                return 0;
            }
        } else if (FIELD("value", F_VALUE)) {
            double v;
            if (lim->input_size != 1 || !parse_number(&c, &v, &is_int) || !value_in_range(v))
                return 0;
            row[0] = v;
        } else if (FIELD("ts", F_TS)) {
            if (!match_literal(&c, "null")) {
                double t;
                if (!parse_number(&c, &t, &is_int) || !codec_finite(t)) return 0;
                if (!(t >= lim->min_ts) || !(t <= lim->latest)) return 0;
                *ts = t;
            }
        } else if (FIELD("reset", F_RESET)) {
            if (!parse_flag(&c, &flag)) return 0;
            *flags |= flag ? 2 : 0;
        } else if (FIELD("end", F_END)) {
            if (!parse_flag(&c, &flag)) return 0;
            *flags |= flag ? 4 : 0;
        } else {
            return 0; /* another field, or one given twice */
        }
#undef FIELD
        skip_ws(&c);
        if (c.p < c.end && *c.p == ',') {
            c.p++;
            skip_ws(&c);
            continue;
        }
        if (c.p < c.end && *c.p == '}') {
            c.p++;
            break;
        }
        return 0;
    }
    skip_ws(&c);
    if (c.p != c.end) return 0;
    if (!(seen & (F_VALUES | F_VALUE)) || (seen & F_VALUES && seen & F_VALUE)) return 0;
    if (key_len > 0) {
        if (key_len > lim->max_id) return 0;
        for (Py_ssize_t i = 0; i < key_len; i++)
            if ((unsigned char)key[i] < 0x20 || (unsigned char)key[i] > 0x7e) return 0;
        if (stream != NULL && (stream_len != key_len || memcmp(stream, key, (size_t)key_len)))
            return 0;
        *id = key;
        *id_len = key_len;
    } else {
        if (stream == NULL || stream_len > lim->max_id) return 0;
        *id = stream;
        *id_len = stream_len;
    }
    *flags |= 1;
    return 1;
}

/* ---- arguments ---------------------------------------------------------- */

/* *out = a * b; 0 with OverflowError where the product does not fit a Py_ssize_t
 * (a batch that large is a caller's bug: never wrap around to a small size). */
static int mul_size(Py_ssize_t a, Py_ssize_t b, Py_ssize_t *out, const char *func) {
    if (a < 0 || b < 0 || (a != 0 && b > PY_SSIZE_T_MAX / a)) {
        PyErr_Format(PyExc_OverflowError, "%s: the arrays' size (%zd x %zd) overflows", func, a,
                     b);
        return 0;
    }
    *out = a * b;
    return 1;
}

/* The element type an array argument must have: one of `codes` (struct module
 * format characters), each item `itemsize` bytes. */
typedef struct {
    const char *codes, *name;
    Py_ssize_t itemsize;
} Kind;

static const Kind K_F64 = {"d", "float64", 8};
/* int64 is 'q', or 'l' where long is 64 bits (numpy's int64 on LP64): itemsize decides. */
static const Kind K_I64 = {"ql", "int64", 8};
static const Kind K_U8 = {"B", "uint8", 1};
static const Kind K_I8 = {"b", "int8", 1};
/* ready is read as a byte, nonzero true: bool or uint8. */
static const Kind K_READY = {"?B", "bool", 1};

/* Whether a buffer's format is one of the kind's codes, in native byte order. */
static int format_is(const char *format, const Kind *kind) {
    if (format == NULL) format = "B"; /* PEP 3118: no format means unsigned bytes */
    if (*format == '@' || *format == '=' || *format == (PY_LITTLE_ENDIAN ? '<' : '>')) format++;
    return format[0] != '\0' && format[1] == '\0' && strchr(kind->codes, format[0]) != NULL;
}

/*
 * obj's buffer as `count` items of `kind` (count -1: any number), C-contiguous and
 * aligned for the item, writable where asked; 0 with TypeError (wrong type) or
 * ValueError (wrong size, misaligned) naming the argument. view->obj is NULL unless
 * the view is held, so that PyBuffer_Release on every view is always right.
 */
static int get_array(PyObject *obj, Py_buffer *view, int writable, const Kind *kind,
                     Py_ssize_t count, const char *func, const char *arg) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        view->obj = NULL;
        return 0;
    }
    if (view->itemsize != kind->itemsize || !format_is(view->format, kind)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a %s array, not format '%s' (itemsize %zd)",
                     func, arg, kind->name, view->format ? view->format : "B", view->itemsize);
        goto fail;
    }
    if (count >= 0 && view->len / kind->itemsize != count) {
        PyErr_Format(PyExc_ValueError, "%s: %s has %zd items, not %zd", func, arg,
                     view->len / kind->itemsize, count);
        goto fail;
    }
    if (view->len % kind->itemsize || (uintptr_t)view->buf % (uintptr_t)kind->itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %s is not aligned for %s", func, arg, kind->name);
        goto fail;
    }
    return 1;
fail:
    PyBuffer_Release(view); /* sets view->obj to NULL */
    return 0;
}

static void release_all(Py_buffer *views, int count) {
    for (int k = 0; k < count; k++) PyBuffer_Release(&views[k]); /* a no-op where obj is NULL */
}

static int64_t attr_int(PyObject *record, PyObject *name, int *ok) {
    PyObject *obj = PyObject_GetAttr(record, name);
    if (obj == NULL) {
        *ok = 0;
        return 0;
    }
    int64_t value = PyLong_AsLongLong(obj);
    Py_DECREF(obj);
    if (value == -1 && PyErr_Occurred()) *ok = 0;
    return value;
}

static PyObject *s_key, *s_value, *s_offset, *s_headers, *s_control;

/* 1 where the record carries the control header ("streamlstm-control": wire.control_of
 * and wire.decode_tick decide), or headers laid out otherwise than a sequence of
 * (str, value) tuples (they decide too); 0 where it carries none; -1 with an exception
 * set. No Python code runs while the headers are looked through: only exact str keys
 * are compared. */
static int has_control(PyObject *record) {
    PyObject *headers = PyObject_GetAttr(record, s_headers);
    if (headers == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear(); /* a record without headers is a tick */
        return 0;
    }
    int found = 0;
    if (headers != Py_None) {
        if (!PyList_CheckExact(headers) && !PyTuple_CheckExact(headers)) {
            found = 1;
        } else {
            Py_ssize_t n = PySequence_Fast_GET_SIZE(headers);
            PyObject **items = PySequence_Fast_ITEMS(headers);
            for (Py_ssize_t i = 0; i < n && !found; i++) {
                PyObject *item = items[i];
                if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 ||
                    !PyUnicode_CheckExact(PyTuple_GET_ITEM(item, 0)))
                    found = 1;
                else if (PyUnicode_Compare(PyTuple_GET_ITEM(item, 0), s_control) == 0)
                    found = 1;
            }
        }
    }
    Py_DECREF(headers);
    return found;
}

/* ---- decoding ----------------------------------------------------------- */

/*
 * decode_ticks(records, input_size, max_value_bytes, max_id_bytes, min_ts_ms, latest_ms,
 *              features, ts, flags, offsets) -> list
 * Row i of features (float64 [n, input_size]), ts (float64), flags (uint8) and offsets
 * (int64) answers records[i]; the list holds the tick's stream id, or None where
 * wire.decode_tick must decide (flags bit 0 clear). A record is anything with offset,
 * key and value (aiokafka's ConsumerRecord or the record its batch reads): its partition
 * is the caller's to fill in.
 */
static PyObject *codec_decode_ticks(PyObject *self, PyObject *args) {
    static const char func[] = "decode_ticks";
    PyObject *records, *o_features, *o_ts, *o_flags, *o_offsets;
    Py_ssize_t input_size, max_value, max_id;
    double min_ts, latest;
    if (!PyArg_ParseTuple(args, "O!nnnddOOOO", &PyList_Type, &records, &input_size, &max_value,
                          &max_id, &min_ts, &latest, &o_features, &o_ts, &o_flags, &o_offsets))
        return NULL;
    if (input_size < 1) {
        PyErr_SetString(PyExc_ValueError, "decode_ticks: input_size must be at least 1");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(records), cells;
    if (!mul_size(n, input_size, &cells, func)) return NULL;
    Py_buffer views[4];
    memset(views, 0, sizeof views);
    Py_buffer *features = &views[0], *ts = &views[1], *flags = &views[2], *offsets = &views[3];
    PyObject *ids = NULL;
    if (!get_array(o_features, features, 1, &K_F64, cells, func, "features") ||
        !get_array(o_ts, ts, 1, &K_F64, n, func, "ts") ||
        /* uint8, not bool: the flags are bits (2: reset, 4: end), not 0 or 1 */
        !get_array(o_flags, flags, 1, &K_U8, n, func, "flags") ||
        !get_array(o_offsets, offsets, 1, &K_I64, n, func, "offsets"))
        goto fail;
    ids = PyList_New(n);
    if (ids == NULL) goto fail;
    Limits lim = {input_size, max_id, min_ts, latest};
    for (Py_ssize_t i = 0; i < n; i++) {
        /* The attribute reads below may run Python code (a property, __getattr__) that
         * changes the list: check its size at each record, and hold the record itself,
         * which the list's reference no longer keeps alive once it is changed. */
        if (PyList_GET_SIZE(records) != n) {
            PyErr_SetString(PyExc_RuntimeError, "decode_ticks: records changed size during the call");
            goto fail;
        }
        PyObject *record = PyList_GET_ITEM(records, i);
        Py_INCREF(record);
        int ok = 1;
        ((int64_t *)offsets->buf)[i] = attr_int(record, s_offset, &ok);
        PyObject *key = ok ? PyObject_GetAttr(record, s_key) : NULL;
        PyObject *value = key != NULL ? PyObject_GetAttr(record, s_value) : NULL;
        int control = value != NULL ? has_control(record) : -1;
        Py_DECREF(record);
        if (control < 0) {
            Py_XDECREF(key);
            Py_XDECREF(value);
            goto fail;
        }
        const char *id = NULL;
        Py_ssize_t id_len = 0;
        uint8_t *flag = (uint8_t *)flags->buf + i;
        *flag = 0;
        ((double *)ts->buf)[i] = NAN;
        if (!control && PyBytes_CheckExact(value) && PyBytes_GET_SIZE(value) <= max_value &&
            (key == Py_None || PyBytes_CheckExact(key))) {
            /* id points into key's or value's bytes: both held until the text is made */
            if (!decode_one(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value),
                            key == Py_None ? NULL : PyBytes_AS_STRING(key),
                            key == Py_None ? 0 : PyBytes_GET_SIZE(key), &lim,
                            (double *)features->buf + i * input_size, (double *)ts->buf + i,
                            flag, &id, &id_len))
                *flag = 0; /* a tick refused halfway may have set its reset or end bit */
        }
        PyObject *text = *flag & 1 ? PyUnicode_DecodeASCII(id, id_len, NULL) /* checked ASCII */
                                   : Py_NewRef(Py_None);
        Py_DECREF(key);
        Py_DECREF(value);
        if (text == NULL) goto fail;
        PyList_SET_ITEM(ids, i, text); /* steals text */
    }
    release_all(views, 4);
    return ids;
fail:
    Py_XDECREF(ids); /* a list with NULL items past i frees what it holds */
    release_all(views, 4);
    return NULL;
}

/* ---- encoding ---------------------------------------------------------- */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Out;

/* Room for `more` bytes; 0 where there is no memory (or the size would overflow). */
static int out_reserve(Out *o, Py_ssize_t more) {
    if (more <= o->cap - o->len) return 1;
    if (more > PY_SSIZE_T_MAX / 2 - o->len) return 0;
    Py_ssize_t cap = (o->len + more) * 2;
    char *data = PyMem_Realloc(o->data, (size_t)cap);
    if (data == NULL) return 0;
    o->data = data;
    o->cap = cap;
    return 1;
}

static int out_write(Out *o, const char *s, Py_ssize_t n) {
    if (n == 0) return 1; /* o->data may still be NULL: memcpy(NULL, ...) is undefined */
    if (!out_reserve(o, n)) return 0;
    memcpy(o->data + o->len, s, (size_t)n);
    o->len += n;
    return 1;
}

/* Decimal, as "%lld" writes it (snprintf's format parsing was ~1% of the daemon's CPU). */
static int out_int(Out *o, long long v) {
    char buf[24], *end = buf + sizeof buf, *p = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *--p = '-';
    return out_write(o, p, end - p);
}

/*
 * A float as orjson writes it: null when not finite; Python's repr where repr is
 * plain decimal (1e-4 <= |x| < 1e16, or zero), which orjson writes the same way.
 * Returns -1 where it cannot be sure (Python writes the record), 0 on no memory.
 */
static int out_float(Out *o, double x) {
    if (!codec_finite(x)) return out_write(o, "null", 4);
    double a = fabs(x);
    if (x != 0.0 && (a < 1e-4 || a >= 1e16)) return -1;
    char *text = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) return 0;
    int ok = out_write(o, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return ok;
}

/* A stream id as a JSON string (orjson escapes only '"', '\\' and C0; C0 goes to Python). */
static int out_id(Out *o, const char *s, Py_ssize_t n) {
    if (n > PY_SSIZE_T_MAX / 2 - 1 || !out_reserve(o, 2 * n + 2)) return 0;
    char *d = o->data + o->len;
    *d++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x20 || ch == 0x7f) return -1;
        if (ch == '"' || ch == '\\') *d++ = '\\';
        *d++ = (char)ch;
    }
    *d++ = '"';
    o->len = d - o->data;
    return 1;
}

#define PUT(call)             \
    do {                      \
        int r_ = (call);      \
        if (r_ != 1) return r_; \
    } while (0)

/* Numbers as orjson wrote them: token k is text[start[k]:start[k] + len[k]]. */
typedef struct {
    const char *text;
    Py_ssize_t *start, *len;
} Tokens;

/* The tokens of a flat JSON array of numbers as orjson writes one (no spaces; numbers
 * and null never hold ',' or ']'): 1 when there are exactly `count`, 0 when not, -1
 * with MemoryError when there is no memory for the table. */
static int split_tokens(const char *text, Py_ssize_t size, Py_ssize_t count, Tokens *t) {
    t->text = text;
    if (size < 2 || text[0] != '[' || text[size - 1] != ']') return 0;
    if (count == 0) return size == 2;
    /* Each token is a byte at least, and each but the last has its ',': a count this
     * text cannot hold is refused before it sizes an allocation. */
    if (count > (size - 1) / 2) return 0;
    t->start = PyMem_New(Py_ssize_t, (size_t)count); /* NULL where the size overflows */
    t->len = PyMem_New(Py_ssize_t, (size_t)count);
    if (t->start == NULL || t->len == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t k = 0, begin = 1;
    for (Py_ssize_t i = 1; i < size; i++) {
        if (text[i] != ',' && text[i] != ']') continue;
        if (k >= count || i == begin) return 0;
        t->start[k] = begin;
        t->len[k++] = i - begin;
        begin = i + 1;
    }
    return k == count;
}

typedef struct {
    const double *ts;
    Tokens predictions, scores;
    int has_scores;
    const int64_t *steps, *partitions, *offsets;
    const uint8_t *ready;
    const int8_t *anomaly;
    Py_ssize_t outputs;
    const char *model;
    Py_ssize_t model_len;
} Results;

/* Record i's value as wire.encode_prediction writes it; -1: leave it to Python. */
static int encode_one(Out *o, const Results *r, Py_ssize_t i, const char *id, Py_ssize_t id_len) {
    o->len = 0;
    PUT(out_write(o, "{\"stream\":", 10));
    PUT(out_id(o, id, id_len));
    PUT(out_write(o, ",\"ts\":", 6));
    double ts = r->ts[i];
    if (!codec_finite(ts)) {
        PUT(out_write(o, "null", 4)); /* NaN: no event time */
    } else if (ts == floor(ts) && fabs(ts) <= 9007199254740992.0) {
        PUT(out_int(o, (long long)ts));
    } else {
        PUT(out_float(o, ts));
    }
    PUT(out_write(o, ",\"prediction\":[", 15));
    for (Py_ssize_t k = i * r->outputs; k < (i + 1) * r->outputs; k++) {
        if (k > i * r->outputs) PUT(out_write(o, ",", 1));
        PUT(out_write(o, r->predictions.text + r->predictions.start[k], r->predictions.len[k]));
    }
    PUT(out_write(o, "],\"partition\":", 14));
    PUT(out_int(o, r->partitions[i]));
    PUT(out_write(o, ",\"offset\":", 10));
    PUT(out_int(o, r->offsets[i]));
    PUT(out_write(o, ",\"step\":", 8));
    PUT(out_int(o, r->steps[i]));
    PUT(r->ready[i] ? out_write(o, ",\"ready\":true", 13) : out_write(o, ",\"ready\":false", 14));
    PUT(out_write(o, ",\"model\":", 9));
    PUT(out_write(o, r->model, r->model_len));
    if (r->has_scores) {
        PUT(out_write(o, ",\"score\":", 9));
        PUT(out_write(o, r->scores.text + r->scores.start[i], r->scores.len[i]));
    }
    if (r->anomaly != NULL && r->anomaly[i] == 0) PUT(out_write(o, ",\"anomaly\":false", 16));
    if (r->anomaly != NULL && r->anomaly[i] == 1) PUT(out_write(o, ",\"anomaly\":true", 15));
    if (r->anomaly != NULL && r->anomaly[i] == 2) PUT(out_write(o, ",\"anomaly\":null", 15));
    PUT(out_write(o, "}", 1));
    return 1;
}
#undef PUT

/*
 * encode_predictions(ids, rows, ts, predictions_json, outputs, steps, ready, partitions,
 *                    offsets, scores_json, anomaly, model_json) -> (keys, values, timestamps)
 * For each row index in rows (int64): the output key (the id's UTF-8), the value
 * (None: wire.encode_prediction must write it) and the timestamp (int ms or None).
 * ts (float64), steps, partitions, offsets (int64), ready (bool) and anomaly (int8)
 * have one item per id. predictions_json is orjson's flat array of the [n, outputs]
 * predictions as float64, scores_json (or None) that of the scores: orjson writes every
 * float, exactly as it writes them in encode_prediction. anomaly (-1 absent, 0 false,
 * 1 true, 2 null) may be None (absent); model_json is the model name as orjson writes it.
 */
static PyObject *codec_encode_predictions(PyObject *self, PyObject *args) {
    static const char func[] = "encode_predictions";
    PyObject *ids, *o_rows, *o_ts, *o_steps, *o_ready, *o_parts, *o_offs, *o_scores, *o_anom;
    const char *model, *preds;
    Py_ssize_t model_len, preds_len, outputs;
    if (!PyArg_ParseTuple(args, "O!OOy#nOOOOOOy#", &PyList_Type, &ids, &o_rows, &o_ts, &preds,
                          &preds_len, &outputs, &o_steps, &o_ready, &o_parts, &o_offs,
                          &o_scores, &o_anom, &model, &model_len))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ids), count;
    Py_buffer views[7];
    memset(views, 0, sizeof views);
    Py_buffer *rows_v = &views[0], *ts_v = &views[1], *steps_v = &views[2], *ready_v = &views[3],
              *parts_v = &views[4], *offs_v = &views[5], *anom_v = &views[6];
    PyObject *result = NULL, *keys = NULL, *values = NULL, *stamps = NULL;
    Out out = {NULL, 0, 0};
    Results r;
    memset(&r, 0, sizeof r);
    if (outputs < 0) {
        PyErr_SetString(PyExc_ValueError, "encode_predictions: outputs must not be negative");
        return NULL;
    }
    if (!mul_size(n, outputs, &count, func)) return NULL;
    if (!get_array(o_rows, rows_v, 0, &K_I64, -1, func, "rows") ||
        !get_array(o_ts, ts_v, 0, &K_F64, n, func, "ts") ||
        !get_array(o_steps, steps_v, 0, &K_I64, n, func, "steps") ||
        !get_array(o_ready, ready_v, 0, &K_READY, n, func, "ready") ||
        !get_array(o_parts, parts_v, 0, &K_I64, n, func, "partitions") ||
        !get_array(o_offs, offs_v, 0, &K_I64, n, func, "offsets") ||
        (o_anom != Py_None && !get_array(o_anom, anom_v, 0, &K_I8, n, func, "anomaly")))
        goto done;
    Py_ssize_t m = rows_v->len / (Py_ssize_t)sizeof(int64_t);
    int split = split_tokens(preds, preds_len, count, &r.predictions);
    if (split != 1) {
        if (split == 0)
            PyErr_SetString(PyExc_ValueError, "encode_predictions: predictions do not match");
        goto done;
    }
    if (o_scores != Py_None) {
        split = PyBytes_Check(o_scores) ? split_tokens(PyBytes_AS_STRING(o_scores),
                                                       PyBytes_GET_SIZE(o_scores), n, &r.scores)
                                        : 0;
        if (split != 1) {
            if (split == 0)
                PyErr_SetString(PyExc_ValueError, "encode_predictions: scores do not match");
            goto done;
        }
        r.has_scores = 1;
    }
    r.ts = ts_v->buf;
    r.steps = steps_v->buf;
    r.partitions = parts_v->buf;
    r.offsets = offs_v->buf;
    r.ready = ready_v->buf;
    r.anomaly = anom_v->buf; /* NULL where anomaly is None */
    r.outputs = outputs;
    r.model = model;
    r.model_len = model_len;
    keys = PyList_New(m);
    values = PyList_New(m);
    stamps = PyList_New(m);
    if (keys == NULL || values == NULL || stamps == NULL) goto done;
    for (Py_ssize_t j = 0; j < m; j++) {
        int64_t i = ((const int64_t *)rows_v->buf)[j];
        if (i < 0 || i >= n) {
            PyErr_SetString(PyExc_IndexError, "encode_predictions: a row is out of range");
            goto done;
        }
        /* Nothing in this loop runs Python code, but the lists above were made with the
         * collector on (a finalizer may change ids): the arrays are sized for n ids. */
        if (PyList_GET_SIZE(ids) != n) {
            PyErr_SetString(PyExc_RuntimeError, "encode_predictions: ids changed size");
            goto done;
        }
        /* Held: id points into the string's UTF-8 while the record is made. */
        PyObject *item = Py_NewRef(PyList_GET_ITEM(ids, i));
        PyObject *key = NULL, *value = NULL, *stamp = NULL;
        const char *id = NULL;
        Py_ssize_t id_len = 0;
        if (PyUnicode_Check(item)) {
            id = PyUnicode_AsUTF8AndSize(item, &id_len);
            if (id == NULL) {
                /* A lone surrogate has no UTF-8: Python writes that record (a dead
                 * letter). Any other error (no memory) is the caller's. */
                if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) goto row_failed;
                PyErr_Clear();
            }
        }
        if (id == NULL) { /* not text: Python decides, key and value alike */
            key = Py_NewRef(Py_None);
            value = Py_NewRef(Py_None);
        } else {
            key = PyBytes_FromStringAndSize(id, id_len);
            if (key == NULL) goto row_failed;
            int ok = encode_one(&out, &r, (Py_ssize_t)i, id, id_len);
            if (ok == 0) {
                PyErr_NoMemory();
                goto row_failed;
            }
            value = ok == 1 ? PyBytes_FromStringAndSize(out.data, out.len) : Py_NewRef(Py_None);
            if (value == NULL) goto row_failed;
        }
        double ts = r.ts[i];
        /* below 2^63 (9.22e18): the cast is defined */
        stamp = codec_finite(ts) && fabs(ts) < 9.2e18 ? PyLong_FromLongLong((long long)ts)
                                                       : Py_NewRef(Py_None);
        if (stamp == NULL) goto row_failed;
        Py_DECREF(item);
        /* Each steals its reference: key, value and stamp are all new ones. */
        PyList_SET_ITEM(keys, j, key);
        PyList_SET_ITEM(values, j, value);
        PyList_SET_ITEM(stamps, j, stamp);
        continue;
    row_failed:
        Py_DECREF(item);
        Py_XDECREF(key);
        Py_XDECREF(value);
        Py_XDECREF(stamp);
        goto done;
    }
    result = PyTuple_Pack(3, keys, values, stamps);
done:
    release_all(views, 7);
    PyMem_Free(r.predictions.start);
    PyMem_Free(r.predictions.len);
    PyMem_Free(r.scores.start);
    PyMem_Free(r.scores.len);
    Py_XDECREF(keys);
    Py_XDECREF(values);
    Py_XDECREF(stamps);
    PyMem_Free(out.data);
    return result;
}

static PyMethodDef codec_methods[] = {
    {"decode_ticks", codec_decode_ticks, METH_VARARGS,
     "A poll's records to step arrays; None where wire.decode_tick decides."},
    {"encode_predictions", codec_encode_predictions, METH_VARARGS,
     "Step results to output keys, values and timestamps; None where Python writes it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT, "_codec",
    "The daemon's per-poll decode and encode (streamlstm/_codec.c).", -1, codec_methods};

PyMODINIT_FUNC PyInit__codec(void) {
    /* Interned once per process: a second load of the module (a test's other build)
     * keeps them. */
    if (s_key == NULL && (s_key = PyUnicode_InternFromString("key")) == NULL) return NULL;
    if (s_value == NULL && (s_value = PyUnicode_InternFromString("value")) == NULL) return NULL;
    if (s_headers == NULL && (s_headers = PyUnicode_InternFromString("headers")) == NULL)
        return NULL;
    if (s_control == NULL && (s_control = PyUnicode_InternFromString("streamlstm-control")) == NULL)
        return NULL;
    if (s_offset == NULL && (s_offset = PyUnicode_InternFromString("offset")) == NULL)
        return NULL;
    return PyModule_Create(&codec_module);
}
