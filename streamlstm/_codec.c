/*
 * The daemon's per-poll wire work, part of the _kernels extension (see
 * streamlstm/native_codec.py): a poll's records to the step request's arrays,
 * and a step's results to output records, in one call each.
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
 * Compiled with the extension's -ffast-math, under which the compiler may
 * assume no NaN or infinity: finiteness is read from the bits, never from
 * isfinite().
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

/* A contiguous, writable buffer of exactly `bytes` bytes. */
static int out_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t bytes) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return 0;
    if (view->len != bytes) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "decode_ticks: an output array has the wrong size");
        return 0;
    }
    return 1;
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

static PyObject *s_key, *s_value, *s_offset;

/*
 * decode_ticks(records, input_size, max_value_bytes, max_id_bytes, min_ts_ms, latest_ms,
 *              features, ts, flags, offsets) -> list
 * Row i of the float64/uint8/int64 arrays answers records[i]; the list holds the
 * tick's stream id, or None where wire.decode_tick must decide (flags bit 0 clear).
 * A record is anything with offset, key and value (aiokafka's ConsumerRecord or the
 * record its batch reads): its partition is the caller's to fill in.
 */
static PyObject *codec_decode_ticks(PyObject *self, PyObject *args) {
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
    Py_ssize_t n = PyList_GET_SIZE(records);
    Py_buffer features, ts, flags, offsets;
    if (!out_buffer(o_features, &features, n * input_size * (Py_ssize_t)sizeof(double)))
        return NULL;
    if (!out_buffer(o_ts, &ts, n * (Py_ssize_t)sizeof(double))) goto fail_ts;
    if (!out_buffer(o_flags, &flags, n)) goto fail_flags;
    if (!out_buffer(o_offsets, &offsets, n * (Py_ssize_t)sizeof(int64_t))) goto fail_offsets;
    PyObject *ids = PyList_New(n);
    if (ids == NULL) goto fail;
    Limits lim = {input_size, max_id, min_ts, latest};
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *record = PyList_GET_ITEM(records, i);
        int ok = 1;
        ((int64_t *)offsets.buf)[i] = attr_int(record, s_offset, &ok);
        if (!ok) goto fail_ids;
        PyObject *key = PyObject_GetAttr(record, s_key);
        if (key == NULL) goto fail_ids;
        PyObject *value = PyObject_GetAttr(record, s_value);
        if (value == NULL) {
            Py_DECREF(key);
            goto fail_ids;
        }
        const char *id = NULL;
        Py_ssize_t id_len = 0;
        uint8_t *flag = (uint8_t *)flags.buf + i;
        *flag = 0;
        if (PyBytes_CheckExact(value) && PyBytes_GET_SIZE(value) <= max_value &&
            (key == Py_None || PyBytes_CheckExact(key))) {
            decode_one(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value),
                       key == Py_None ? NULL : PyBytes_AS_STRING(key),
                       key == Py_None ? 0 : PyBytes_GET_SIZE(key), &lim,
                       (double *)features.buf + i * input_size, (double *)ts.buf + i, flag, &id,
                       &id_len);
        }
        PyObject *text = Py_None;
        Py_INCREF(Py_None);
        if (*flag & 1) {
            Py_DECREF(Py_None);
            text = PyUnicode_DecodeASCII(id, id_len, NULL); /* printable ASCII, checked */
        }
        Py_DECREF(key);
        Py_DECREF(value);
        if (text == NULL) goto fail_ids;
        PyList_SET_ITEM(ids, i, text);
    }
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&flags);
    PyBuffer_Release(&ts);
    PyBuffer_Release(&features);
    return ids;
fail_ids:
    Py_DECREF(ids);
fail:
    PyBuffer_Release(&offsets);
fail_offsets:
    PyBuffer_Release(&flags);
fail_flags:
    PyBuffer_Release(&ts);
fail_ts:
    PyBuffer_Release(&features);
    return NULL;
}

/* ---- encoding ---------------------------------------------------------- */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t more) {
    if (o->len + more <= o->cap) return 1;
    Py_ssize_t cap = (o->len + more) * 2;
    char *data = PyMem_Realloc(o->data, (size_t)cap);
    if (data == NULL) return 0;
    o->data = data;
    o->cap = cap;
    return 1;
}

static int out_write(Out *o, const char *s, Py_ssize_t n) {
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
    if (!out_reserve(o, 2 * n + 2)) return 0;
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
 * and null never hold ',' or ']'); 0 unless there are exactly `count`. */
static int split_tokens(const char *text, Py_ssize_t size, Py_ssize_t count, Tokens *t) {
    t->text = text;
    t->start = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(count ? count : 1));
    t->len = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(count ? count : 1));
    if (t->start == NULL || t->len == NULL) return 0;
    if (size < 2 || text[0] != '[' || text[size - 1] != ']') return 0;
    if (count == 0) return size == 2;
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

static int in_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t bytes, int optional) {
    if (optional && obj == Py_None) {
        view->obj = NULL;
        view->buf = NULL;
        return 1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) return 0;
    if (view->len != bytes) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "encode_predictions: an array has the wrong size");
        return 0;
    }
    return 1;
}

/*
 * encode_predictions(ids, rows, ts, predictions_json, outputs, steps, ready, partitions,
 *                    offsets, scores_json, anomaly, model_json) -> (keys, values, timestamps)
 * For each row index in rows (int64): the output key (the id's UTF-8), the value
 * (None: wire.encode_prediction must write it) and the timestamp (int ms or None).
 * predictions_json is orjson's flat array of the [n, outputs] predictions as float64,
 * scores_json (or None) that of the scores: orjson writes every float, exactly as it
 * writes them in encode_prediction. anomaly (int8: -1 absent, 0 false, 1 true, 2 null)
 * may be None (absent);
 * model_json is the model name as orjson writes it.
 */
static PyObject *codec_encode_predictions(PyObject *self, PyObject *args) {
    PyObject *ids, *o_rows, *o_ts, *o_steps, *o_ready, *o_parts, *o_offs, *o_scores, *o_anom;
    const char *model, *preds;
    Py_ssize_t model_len, preds_len, outputs;
    if (!PyArg_ParseTuple(args, "O!OOy#nOOOOOOy#", &PyList_Type, &ids, &o_rows, &o_ts, &preds,
                          &preds_len, &outputs, &o_steps, &o_ready, &o_parts, &o_offs,
                          &o_scores, &o_anom, &model, &model_len))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ids);
    Py_buffer rows_v, ts_v, steps_v, ready_v, parts_v, offs_v, anom_v;
    Py_buffer *views[7] = {&rows_v, &ts_v, &steps_v, &ready_v, &parts_v, &offs_v, &anom_v};
    int got = 0;
    PyObject *result = NULL, *keys = NULL, *values = NULL, *stamps = NULL;
    Out out = {NULL, 0, 0};
    Results r;
    memset(&r, 0, sizeof r);
    if (PyObject_GetBuffer(o_rows, &rows_v, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    got = 1;
    if (rows_v.len % (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "encode_predictions: rows must be int64");
        goto done;
    }
    Py_ssize_t m = rows_v.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t e = (Py_ssize_t)sizeof(int64_t), d = (Py_ssize_t)sizeof(double);
    if (!in_buffer(o_ts, &ts_v, n * d, 0)) goto done;
    got++;
    if (!in_buffer(o_steps, &steps_v, n * e, 0)) goto done;
    got++;
    if (!in_buffer(o_ready, &ready_v, n, 0)) goto done;
    got++;
    if (!in_buffer(o_parts, &parts_v, n * e, 0)) goto done;
    got++;
    if (!in_buffer(o_offs, &offs_v, n * e, 0)) goto done;
    got++;
    if (!in_buffer(o_anom, &anom_v, n, 1)) goto done;
    got++;
    if (outputs < 0 || !split_tokens(preds, preds_len, n * outputs, &r.predictions)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "encode_predictions: predictions do not match");
        goto done;
    }
    if (o_scores != Py_None) {
        if (!PyBytes_Check(o_scores) ||
            !split_tokens(PyBytes_AS_STRING(o_scores), PyBytes_GET_SIZE(o_scores), n,
                          &r.scores)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "encode_predictions: scores do not match");
            goto done;
        }
        r.has_scores = 1;
    }
    r.ts = ts_v.buf;
    r.steps = steps_v.buf;
    r.partitions = parts_v.buf;
    r.offsets = offs_v.buf;
    r.ready = ready_v.buf;
    r.anomaly = anom_v.buf;
    r.outputs = outputs;
    r.model = model;
    r.model_len = model_len;
    keys = PyList_New(m);
    values = PyList_New(m);
    stamps = PyList_New(m);
    if (keys == NULL || values == NULL || stamps == NULL) goto done;
    for (Py_ssize_t j = 0; j < m; j++) {
        int64_t i = ((const int64_t *)rows_v.buf)[j];
        if (i < 0 || i >= n) {
            PyErr_SetString(PyExc_IndexError, "encode_predictions: a row is out of range");
            goto done;
        }
        Py_ssize_t id_len;
        PyObject *key = NULL, *value = Py_None, *stamp = Py_None;
        const char *id = PyUnicode_Check(PyList_GET_ITEM(ids, i))
                             ? PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(ids, i), &id_len)
                             : NULL;
        if (id == NULL) {
            PyErr_Clear(); /* not text (a lone surrogate): Python decides */
            key = Py_None;
            Py_INCREF(Py_None);
        } else {
            key = PyBytes_FromStringAndSize(id, id_len);
            if (key == NULL) goto done;
            int ok = encode_one(&out, &r, i, id, id_len);
            if (ok == 0) {
                Py_DECREF(key);
                PyErr_NoMemory();
                goto done;
            }
            if (ok == 1) value = PyBytes_FromStringAndSize(out.data, out.len);
            else Py_INCREF(Py_None);
            if (value == NULL) {
                Py_DECREF(key);
                goto done;
            }
        }
        double ts = r.ts[i];
        if (codec_finite(ts) && fabs(ts) < 9.2e18) stamp = PyLong_FromLongLong((long long)ts);
        else Py_INCREF(Py_None);
        if (stamp == NULL) {
            Py_DECREF(key);
            Py_DECREF(value);
            goto done;
        }
        PyList_SET_ITEM(keys, j, key);
        PyList_SET_ITEM(values, j, value);
        PyList_SET_ITEM(stamps, j, stamp);
    }
    result = PyTuple_Pack(3, keys, values, stamps);
done:
    for (int k = 0; k < got; k++)
        if (views[k]->obj != NULL) PyBuffer_Release(views[k]);
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

PyMethodDef sl_codec_methods[] = {
    {"decode_ticks", codec_decode_ticks, METH_VARARGS,
     "A poll's records to step arrays; None where wire.decode_tick decides."},
    {"encode_predictions", codec_encode_predictions, METH_VARARGS,
     "Step results to output keys, values and timestamps; None where Python writes it."},
    {NULL, NULL, 0, NULL},
};

int sl_codec_init(void) {
    s_key = PyUnicode_InternFromString("key");
    s_value = PyUnicode_InternFromString("value");
    s_offset = PyUnicode_InternFromString("offset");
    return s_key && s_value && s_offset ? 0 : -1;
}
