/*
 * runtime._native: the runtime's hot CPU paths in plain C99 against the CPython API.
 *
 * Arrays come in through the buffer protocol (numpy arrays, memoryviews, ...); no numpy headers,
 * no special compiler flags, so the same file builds on x86_64 and aarch64. Results are numpy
 * arrays allocated by calling numpy.empty through the Python API. Every loop runs without the
 * GIL. Each function has a numpy twin in runtime/preprocess.py or runtime/postprocess.py, and
 * tests/test_native.py compares the two.
 *
 * Conventions (docs/architecture.md): boxes are xyxy float32 pixels; the letterbox scale is
 * s = min(H / h, W / w) on an H x W canvas (S / max(h, w) on a square one), resized size
 * (round(w*s), round(h*s)) with round-half-up, placed top-left.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Buffer helpers                                                                             */

enum { DT_F32 = 1, DT_U8 = 2, DT_BOOL = 4, DT_I32 = 8, DT_I64 = 16 };

/* The single native-order item code of a struct format string, or 0 for anything else. */
static char format_code(const char *fmt)
{
    if (fmt == NULL)
        return 'B';
    if (*fmt == '@' || *fmt == '=')
        fmt++;
    else if (*fmt == '<' || *fmt == '>' || *fmt == '!') {
        int little = (*fmt == '<');
        if (little != PY_LITTLE_ENDIAN)
            return 0;
        fmt++;
    }
    if (fmt[0] == '\0' || fmt[1] != '\0')
        return 0;
    return fmt[0];
}

static int dtype_of(const Py_buffer *v)
{
    char c = format_code(v->format);
    Py_ssize_t n = v->itemsize;
    if (c == 'f' && n == 4) return DT_F32;
    if (c == 'B' && n == 1) return DT_U8;
    if (c == '?' && n == 1) return DT_BOOL;
    if ((c == 'i' || c == 'l') && n == 4) return DT_I32;
    if ((c == 'l' || c == 'q') && n == 8) return DT_I64;
    return 0;
}

static const char *dtype_name(const Py_buffer *v)
{
    char c = format_code(v->format);
    Py_ssize_t n = v->itemsize;
    switch (c) {
    case 'f': return n == 4 ? "float32" : "float";
    case 'd': return "float64";
    case 'e': return "float16";
    case 'B': return "uint8";
    case 'b': return "int8";
    case '?': return "bool";
    case 'h': return "int16";
    case 'H': return "uint16";
    case 'i': case 'l': case 'q': return n == 8 ? "int64" : "int32";
    case 'I': case 'L': case 'Q': return n == 8 ? "uint64" : "uint32";
    default: return v->format ? v->format : "unknown";
    }
}

/* Get a buffer (strided, with format) from `obj`; TypeError if it is not an array. */
static int get_buffer(PyObject *obj, const char *name, Py_buffer *view, int writable)
{
    int flags = writable ? PyBUF_RECORDS : PyBUF_RECORDS_RO;
    if (PyObject_GetBuffer(obj, view, flags) == 0)
        return 0;
    if (PyObject_CheckBuffer(obj)) { /* exporters raise BufferError or ValueError */
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be a %sstrided array", name,
                     writable ? "writable " : "");
    } else {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be an array (buffer protocol), got %.100s", name,
                     Py_TYPE(obj)->tp_name);
    }
    view->obj = NULL;
    return -1;
}

/* Get a C-contiguous array of one of the dtypes in `dtypes` and `ndim` dimensions. */
static int get_array(PyObject *obj, const char *name, Py_buffer *view, int dtypes, int ndim,
                     const char *expect, int writable)
{
    if (get_buffer(obj, name, view, writable) < 0)
        return -1;
    if (!(dtype_of(view) & dtypes)) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, got %s", name, expect, dtype_name(view));
        goto fail;
    }
    if (view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension%s, got %d", name, ndim,
                     ndim == 1 ? "" : "s", view->ndim);
        goto fail;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be C-contiguous (use numpy.ascontiguousarray)", name);
        goto fail;
    }
    return 0;
fail:
    PyBuffer_Release(view);
    return -1;
}

/* numpy.empty(shape, dtype) through the Python API, and a writable buffer onto it. */
static PyObject *new_array(int ndim, const Py_ssize_t *shape, const char *dtype, Py_buffer *view)
{
    PyObject *np = NULL, *shp = NULL, *arr = NULL;
    np = PyImport_ImportModule("numpy");
    if (np == NULL)
        return NULL;
    shp = PyTuple_New(ndim);
    if (shp == NULL)
        goto done;
    for (int i = 0; i < ndim; i++) {
        PyObject *d = PyLong_FromSsize_t(shape[i]);
        if (d == NULL)
            goto done;
        PyTuple_SET_ITEM(shp, i, d);
    }
    arr = PyObject_CallMethod(np, "empty", "Os", shp, dtype);
    if (arr != NULL && PyObject_GetBuffer(arr, view, PyBUF_RECORDS | PyBUF_C_CONTIGUOUS) < 0)
        Py_CLEAR(arr);
done:
    Py_XDECREF(shp);
    Py_DECREF(np);
    return arr;
}

static int parse_triple(PyObject *obj, const char *name, double out[3])
{
    PyObject *seq = PySequence_Fast(obj, "");
    if (seq == NULL || PySequence_Fast_GET_SIZE(seq) != 3) {
        Py_XDECREF(seq);
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be a sequence of 3 numbers", name);
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s must be a sequence of 3 numbers", name);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Sorting: stable, by score descending, NaN last                                             */

/* 1 if index a must come strictly before index b. */
static inline int goes_before(const float *s, int64_t a, int64_t b)
{
    float x = s[a], y = s[b];
    return x > y || (isnan(y) && !isnan(x));
}

static void merge_sort(int64_t *idx, int64_t *tmp, Py_ssize_t n, const float *s)
{
    /* Insertion sort on runs of 16, then bottom-up merges (stable throughout). */
    const Py_ssize_t run = 16;
    for (Py_ssize_t lo = 0; lo < n; lo += run) {
        Py_ssize_t hi = lo + run < n ? lo + run : n;
        for (Py_ssize_t i = lo + 1; i < hi; i++) {
            int64_t v = idx[i];
            Py_ssize_t j = i;
            while (j > lo && goes_before(s, v, idx[j - 1])) {
                idx[j] = idx[j - 1];
                j--;
            }
            idx[j] = v;
        }
    }
    int64_t *src = idx, *dst = tmp;
    for (Py_ssize_t width = run; width < n; width *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * width) {
            Py_ssize_t mid = lo + width < n ? lo + width : n;
            Py_ssize_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            Py_ssize_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                dst[k++] = goes_before(s, src[j], src[i]) ? src[j++] : src[i++];
            while (i < mid) dst[k++] = src[i++];
            while (j < hi) dst[k++] = src[j++];
        }
        int64_t *t = src; src = dst; dst = t;
    }
    if (src != idx)
        memcpy(idx, src, (size_t)n * sizeof(int64_t));
}

/* Fill idx with 0..n-1 sorted by score desc (stable). Returns -1 on allocation failure. */
static int argsort_desc(const float *s, Py_ssize_t n, int64_t *idx)
{
    int64_t *tmp = (int64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (tmp == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++)
        idx[i] = i;
    merge_sort(idx, tmp, n, s);
    free(tmp);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* letterbox                                                                                  */

typedef struct {
    const uint8_t *src;
    Py_ssize_t h, w, s0, s1;    /* rows, columns, byte strides of a row and a pixel */
    Py_ssize_t coff[3];         /* byte offset of the R, G, B source channel in a pixel */
    float *out;                 /* [3, OH, OW] */
    Py_ssize_t oh, ow, nw, nh;  /* canvas height and width, resized width and height */
    double scale;               /* min(OH / h, OW / w) */
    float mul[3], add[3];       /* out = v * mul + add == (v / 255 - mean) / std */
} Letterbox;

/* OpenCV INTER_LINEAR taps for one axis: source index pairs (clamped) and weight of the second. */
static void linear_taps(Py_ssize_t src_len, Py_ssize_t dst_len, Py_ssize_t *i0, Py_ssize_t *i1,
                        float *a)
{
    double scale = (double)src_len / (double)dst_len;
    for (Py_ssize_t d = 0; d < dst_len; d++) {
        float f = (float)((d + 0.5) * scale - 0.5);
        Py_ssize_t k = (Py_ssize_t)floorf(f);
        a[d] = f - (float)k;
        Py_ssize_t k1 = k + 1;
        i0[d] = k < 0 ? 0 : (k > src_len - 1 ? src_len - 1 : k);
        i1[d] = k1 < 0 ? 0 : (k1 > src_len - 1 ? src_len - 1 : k1);
    }
}

/* Horizontally resample source row y into planar dst [3, nw]. x0/x1 are byte offsets. */
static void resample_row(const Letterbox *L, Py_ssize_t y, const Py_ssize_t *x0,
                         const Py_ssize_t *x1, const float *ax, float *dst)
{
    const uint8_t *row = L->src + y * L->s0;
    for (int c = 0; c < 3; c++) {
        const uint8_t *r = row + L->coff[c];
        float *d = dst + c * L->nw;
        for (Py_ssize_t x = 0; x < L->nw; x++) {
            float p0 = (float)r[x0[x]], p1 = (float)r[x1[x]];
            d[x] = p0 + ax[x] * (p1 - p0);
        }
    }
}

static int run_letterbox(const Letterbox *L)
{
    Py_ssize_t nw = L->nw, nh = L->nh, OW = L->ow, OH = L->oh;
    Py_ssize_t *xi = (Py_ssize_t *)malloc((size_t)(2 * nw + 2 * nh) * sizeof(Py_ssize_t));
    float *wts = (float *)malloc((size_t)(nw + nh + 6 * nw) * sizeof(float));
    if (xi == NULL || wts == NULL) {
        free(xi);
        free(wts);
        return -1;
    }
    Py_ssize_t *x0 = xi, *x1 = xi + nw, *y0 = xi + 2 * nw, *y1 = y0 + nh;
    float *ax = wts, *ay = wts + nw, *rows[2] = {wts + nw + nh, wts + nw + nh + 3 * nw};
    Py_ssize_t cached[2] = {-1, -1};

    linear_taps(L->w, nw, x0, x1, ax);
    linear_taps(L->h, nh, y0, y1, ay);
    for (Py_ssize_t x = 0; x < nw; x++) {
        x0[x] *= L->s1;
        x1[x] *= L->s1;
    }
    for (Py_ssize_t y = 0; y < nh; y++) {
        /* Two row slots; fill the one not holding the other row this output row needs. */
        int i0 = cached[0] == y0[y] ? 0 : (cached[1] == y0[y] ? 1 : -1);
        if (i0 < 0) {
            i0 = cached[0] == y1[y] ? 1 : 0;
            resample_row(L, y0[y], x0, x1, ax, rows[i0]);
            cached[i0] = y0[y];
        }
        int i1 = cached[i0] == y1[y] ? i0 : 1 - i0;
        if (cached[i1] != y1[y]) {
            resample_row(L, y1[y], x0, x1, ax, rows[i1]);
            cached[i1] = y1[y];
        }
        float b = ay[y];
        for (int c = 0; c < 3; c++) {
            const float *r0 = rows[i0] + c * nw, *r1 = rows[i1] + c * nw;
            float *o = L->out + (c * OH + y) * OW;
            float mul = L->mul[c], add = L->add[c];
            for (Py_ssize_t x = 0; x < nw; x++)
                o[x] = (r0[x] + b * (r1[x] - r0[x])) * mul + add;
            memset(o + nw, 0, (size_t)(OW - nw) * sizeof(float));
        }
    }
    for (int c = 0; c < 3; c++)
        memset(L->out + (c * OH + nh) * OW, 0, (size_t)((OH - nh) * OW) * sizeof(float));
    free(xi);
    free(wts);
    return 0;
}

/* Round half up and clamp to [1, S]: the resized length of a side on a canvas side of S. */
static Py_ssize_t resized_len(Py_ssize_t len, double scale, Py_ssize_t S)
{
    double v = floor((double)len * scale + 0.5);
    if (v < 1.0) return 1;
    if (v > (double)S) return S;
    return (Py_ssize_t)v;
}

/* Validate src and out and fill the geometry of L. */
static int letterbox_setup(Letterbox *L, Py_buffer *src, Py_buffer *out, int bgr)
{
    if (dtype_of(src) != DT_U8) {
        PyErr_Format(PyExc_TypeError, "src must be uint8, got %s", dtype_name(src));
        return -1;
    }
    Py_ssize_t ch = src->ndim == 3 ? src->shape[2] : 1;
    if ((src->ndim != 2 && src->ndim != 3) || !(ch == 1 || ch == 3 || ch == 4)) {
        PyErr_SetString(PyExc_ValueError, "src must be HxW, HxWx1, HxWx3 or HxWx4");
        return -1;
    }
    if (src->shape[0] < 1 || src->shape[1] < 1) {
        PyErr_Format(PyExc_ValueError, "src is an empty image (%zd x %zd)", src->shape[0],
                     src->shape[1]);
        return -1;
    }
    if (dtype_of(out) != DT_F32 || out->ndim != 3 || out->shape[0] != 3 ||
        out->shape[1] < 1 || out->shape[2] < 1 || !PyBuffer_IsContiguous(out, 'C')) {
        PyErr_SetString(PyExc_ValueError,
                        "out must be a writable C-contiguous float32 array of shape (3, H, W)");
        return -1;
    }
    L->src = (const uint8_t *)src->buf;
    L->h = src->shape[0];
    L->w = src->shape[1];
    L->s0 = src->strides[0];
    L->s1 = src->strides[1];
    Py_ssize_t s2 = src->ndim == 3 ? src->strides[2] : 0;
    for (int c = 0; c < 3; c++)
        L->coff[c] = ch == 1 ? 0 : (bgr ? 2 - c : c) * s2;
    L->out = (float *)out->buf;
    L->oh = out->shape[1];
    L->ow = out->shape[2];
    double sh = (double)L->oh / (double)L->h, sw = (double)L->ow / (double)L->w;
    L->scale = sh < sw ? sh : sw;
    L->nw = resized_len(L->w, L->scale, L->ow);
    L->nh = resized_len(L->h, L->scale, L->oh);
    return 0;
}

PyDoc_STRVAR(letterbox_doc,
"letterbox(src, out, mean, std, bgr_input=False) -> (scale, new_w, new_h)\n\n"
"Resize uint8 src (HxW, HxWx1, HxWx3 RGB/BGR or HxWx4 RGBA/BGRA, any strides) into float32\n"
"out [3, OH, OW] (C-contiguous, overwritten): scale = min(OH / H, OW / W) (S / max(H, W) on a\n"
"square S x S canvas), resized size (round(W*scale), round(H*scale)) rounded half up, bilinear\n"
"with half-pixel centres (OpenCV INTER_LINEAR), placed top-left, normalised (x/255 - mean)/std, CHW, channel order RGB, the\n"
"rest 0. Grayscale is replicated to RGB, alpha is ignored.");

static PyObject *py_letterbox(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"src", "out", "mean", "std", "bgr_input", NULL};
    PyObject *src_o, *out_o, *mean_o, *std_o;
    int bgr = 0;
    double mean[3], std[3];
    Py_buffer src = {0}, out = {0};
    Letterbox L;
    PyObject *result = NULL;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|p:letterbox", kwlist, &src_o, &out_o,
                                     &mean_o, &std_o, &bgr))
        return NULL;
    if (parse_triple(mean_o, "mean", mean) < 0 || parse_triple(std_o, "std", std) < 0)
        return NULL;
    for (int c = 0; c < 3; c++) {
        if (!isfinite(mean[c]) || !isfinite(std[c]) || std[c] == 0.0) {
            PyErr_SetString(PyExc_ValueError, "mean must be finite and std finite and non-zero");
            return NULL;
        }
        L.mul[c] = (float)(1.0 / (255.0 * std[c]));
        L.add[c] = (float)(-mean[c] / std[c]);
    }
    if (get_buffer(src_o, "src", &src, 0) < 0 || get_buffer(out_o, "out", &out, 1) < 0)
        goto done;
    if (letterbox_setup(&L, &src, &out, bgr) < 0)
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_letterbox(&L);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_BuildValue("(dnn)", L.scale, L.nw, L.nh);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* phrase_scores                                                                              */

static inline float sigmoidf(float x)
{
    if (x >= 0.0f)
        return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

typedef struct {
    const float *logits, *ctr;     /* [N, T], [N] */
    float *scores;                 /* [N, P] */
    Py_ssize_t n, t, p;
    Py_ssize_t n_active;           /* tokens used by any phrase */
    Py_ssize_t *active;            /* [n_active] token index */
    Py_ssize_t *start;             /* [P + 1] offsets into slot/weight */
    Py_ssize_t *slot;              /* index into active[] */
    float *weight, *wsum;          /* per entry, per phrase */
} PhraseScores;

/* Build the sparse per-phrase token lists from the dense map. Needs the GIL only for errors. */
static int phrase_lists(PhraseScores *ps, const Py_buffer *map)
{
    Py_ssize_t P = ps->p, T = ps->t;
    int dt = dtype_of(map);
    Py_ssize_t *slot_of = (Py_ssize_t *)malloc((size_t)(T + 1) * sizeof(Py_ssize_t));
    ps->active = (Py_ssize_t *)malloc((size_t)(T + 1) * sizeof(Py_ssize_t));
    ps->start = (Py_ssize_t *)malloc((size_t)(P + 1) * sizeof(Py_ssize_t));
    ps->slot = (Py_ssize_t *)malloc((size_t)(P * T + 1) * sizeof(Py_ssize_t));
    ps->weight = (float *)malloc((size_t)(P * T + 1) * sizeof(float));
    ps->wsum = (float *)malloc((size_t)(P + 1) * sizeof(float));
    if (!slot_of || !ps->active || !ps->start || !ps->slot || !ps->weight || !ps->wsum) {
        free(slot_of);
        return -1;
    }
    for (Py_ssize_t t = 0; t < T; t++)
        slot_of[t] = -1;
    ps->n_active = 0;
    Py_ssize_t k = 0;
    for (Py_ssize_t p = 0; p < P; p++) {
        ps->start[p] = k;
        float sum = 0.0f;
        for (Py_ssize_t t = 0; t < T; t++) {
            float w = dt == DT_F32 ? ((const float *)map->buf)[p * T + t]
                                   : (float)((const uint8_t *)map->buf)[p * T + t];
            if (w == 0.0f)
                continue;
            if (slot_of[t] < 0) {
                slot_of[t] = ps->n_active;
                ps->active[ps->n_active++] = t;
            }
            ps->slot[k] = slot_of[t];
            ps->weight[k++] = w;
            sum += w;
        }
        ps->wsum[p] = sum;
    }
    ps->start[P] = k;
    free(slot_of);
    return 0;
}

static int run_phrase_scores(const PhraseScores *ps)
{
    float *sig = (float *)malloc((size_t)(ps->n_active + 1) * sizeof(float));
    if (sig == NULL)
        return -1;
    for (Py_ssize_t n = 0; n < ps->n; n++) {
        const float *row = ps->logits + n * ps->t;
        for (Py_ssize_t a = 0; a < ps->n_active; a++)
            sig[a] = sigmoidf(row[ps->active[a]]);
        float c = sigmoidf(ps->ctr[n]);
        float *out = ps->scores + n * ps->p;
        for (Py_ssize_t p = 0; p < ps->p; p++) {
            float acc = 0.0f;
            for (Py_ssize_t k = ps->start[p]; k < ps->start[p + 1]; k++)
                acc += ps->weight[k] * sig[ps->slot[k]];
            out[p] = ps->wsum[p] > 0.0f ? acc / ps->wsum[p] * c : 0.0f;
        }
    }
    free(sig);
    return 0;
}

PyDoc_STRVAR(phrase_scores_doc,
"phrase_scores(token_logits, centerness, phrase_map) -> float32 [N, P]\n\n"
"token_logits float32 [N, T], centerness float32 [N] (logits), phrase_map float32, uint8 or\n"
"bool [P, T] (token weights; 0/1 for membership). score[n, p] = sum_t w[p,t] sigmoid(l[n,t]) /\n"
"sum_t w[p,t] * sigmoid(centerness[n]), i.e. the mean over the phrase's tokens; 0 for a phrase\n"
"whose weights do not sum to > 0.");

static PyObject *py_phrase_scores(PyObject *self, PyObject *args)
{
    PyObject *lo, *co, *mo, *result = NULL;
    Py_buffer lg = {0}, ct = {0}, mp = {0}, sc = {0};
    PhraseScores ps;
    (void)self;
    memset(&ps, 0, sizeof(ps));
    if (!PyArg_ParseTuple(args, "OOO:phrase_scores", &lo, &co, &mo))
        return NULL;
    if (get_array(lo, "token_logits", &lg, DT_F32, 2, "float32", 0) < 0 ||
        get_array(co, "centerness", &ct, DT_F32, 1, "float32", 0) < 0 ||
        get_array(mo, "phrase_map", &mp, DT_F32 | DT_U8 | DT_BOOL, 2, "float32, uint8 or bool",
                  0) < 0)
        goto done;
    if (ct.shape[0] != lg.shape[0] || mp.shape[1] != lg.shape[1]) {
        PyErr_Format(PyExc_ValueError,
                     "shapes disagree: token_logits [%zd, %zd], centerness [%zd], phrase_map "
                     "[%zd, %zd] (need [N, T], [N], [P, T])",
                     lg.shape[0], lg.shape[1], ct.shape[0], mp.shape[0], mp.shape[1]);
        goto done;
    }
    ps.n = lg.shape[0];
    ps.t = lg.shape[1];
    ps.p = mp.shape[0];
    Py_ssize_t shape[2] = {ps.n, ps.p};
    result = new_array(2, shape, "float32", &sc);
    if (result == NULL)
        goto done;
    ps.logits = (const float *)lg.buf;
    ps.ctr = (const float *)ct.buf;
    ps.scores = (float *)sc.buf;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = phrase_lists(&ps, &mp);
    if (rc == 0)
        rc = run_phrase_scores(&ps);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_CLEAR(result);
        PyErr_NoMemory();
    }
done:
    free(ps.active);
    free(ps.start);
    free(ps.slot);
    free(ps.weight);
    free(ps.wsum);
    PyBuffer_Release(&lg);
    PyBuffer_Release(&ct);
    PyBuffer_Release(&mp);
    PyBuffer_Release(&sc);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* nms, nms_per_class                                                                         */

/* Width or height of a box side; NaN and negative count as 0 (numpy twin: np.where(d > 0)). */
static inline double side(double lo, double hi)
{
    double d = hi - lo;
    return d > 0.0 ? d : 0.0;
}

static inline double iou(const float *a, const float *b, double area_a, double area_b)
{
    double ix1 = a[0] > b[0] ? a[0] : b[0], iy1 = a[1] > b[1] ? a[1] : b[1];
    double ix2 = a[2] < b[2] ? a[2] : b[2], iy2 = a[3] < b[3] ? a[3] : b[3];
    double inter = side(ix1, ix2) * side(iy1, iy2);
    double uni = area_a + area_b - inter;
    return uni > 0.0 ? inter / uni : 0.0;
}

/* IoU with the +1 pixel convention of maskrcnn_benchmark's CUDA nms / ml_nms kernels (devIoU),
   in float as there; fmaxf/fminf as CUDA's max/min on floats (a NaN operand gives the other). */
static inline float iou_plus1(const float *a, const float *b)
{
    float left = fmaxf(a[0], b[0]), right = fminf(a[2], b[2]);
    float top = fmaxf(a[1], b[1]), bottom = fminf(a[3], b[3]);
    float width = fmaxf(right - left + 1.0f, 0.0f), height = fmaxf(bottom - top + 1.0f, 0.0f);
    float inter = width * height;
    float sa = (a[2] - a[0] + 1.0f) * (a[3] - a[1] + 1.0f);
    float sb = (b[2] - b[0] + 1.0f) * (b[3] - b[1] + 1.0f);
    return inter / (sa + sb - inter);
}

/* Greedy NMS; classes may be NULL (one class). Writes kept indices, returns their count.
   plus1: the official +1 IoU in float (iou_plus1) instead of the continuous IoU in double. */
static Py_ssize_t run_nms(const float *boxes, const float *scores, const int64_t *classes,
                          Py_ssize_t n, double thr, int plus1, int64_t *keep)
{
    const float thr_f = (float)thr;
    int64_t *order = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    double *area = (double *)malloc((size_t)(n + 1) * sizeof(double));
    char *dead = (char *)calloc((size_t)(n + 1), 1);
    Py_ssize_t kept = -1;
    if (order == NULL || area == NULL || dead == NULL || argsort_desc(scores, n, order) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *b = boxes + 4 * i;
        area[i] = side(b[0], b[2]) * side(b[1], b[3]);
    }
    kept = 0;
    for (Py_ssize_t a = 0; a < n; a++) {
        int64_t i = order[a];
        if (dead[i])
            continue;
        keep[kept++] = i;
        for (Py_ssize_t b = a + 1; b < n; b++) {
            int64_t j = order[b];
            if (dead[j] || (classes != NULL && classes[j] != classes[i]))
                continue;
            if (plus1 ? iou_plus1(boxes + 4 * i, boxes + 4 * j) > thr_f
                      : iou(boxes + 4 * i, boxes + 4 * j, area[i], area[j]) > thr)
                dead[j] = 1;
        }
    }
done:
    free(order);
    free(area);
    free(dead);
    return kept;
}

/* Shared body of nms, nms_per_class and ml_nms (plus1: +1 IoU, kept indices ascending). */
static PyObject *nms_common(PyObject *bo, PyObject *so, PyObject *co, double thr, int plus1)
{
    Py_buffer bx = {0}, sc = {0}, cl = {0}, kp = {0};
    PyObject *keep = NULL, *result = NULL;
    int64_t *classes = NULL;

    if (!(thr >= 0.0 && thr <= 1.0)) {
        PyErr_Format(PyExc_ValueError, "iou_threshold must be in [0, 1], got %g", thr);
        return NULL;
    }
    if (get_array(bo, "boxes", &bx, DT_F32, 2, "float32", 0) < 0 ||
        get_array(so, "scores", &sc, DT_F32, 1, "float32", 0) < 0 ||
        (co != NULL && get_array(co, "classes", &cl, DT_I32 | DT_I64, 1, "int32 or int64", 0) < 0))
        goto done;
    Py_ssize_t n = bx.shape[0];
    if (bx.shape[1] != 4 || sc.shape[0] != n || (co != NULL && cl.shape[0] != n)) {
        PyErr_Format(PyExc_ValueError,
                     "shapes disagree: boxes [%zd, %zd], scores [%zd]%s (need [N, 4], [N]%s)",
                     bx.shape[0], bx.shape[1], sc.shape[0], co != NULL ? ", classes [..]" : "",
                     co != NULL ? ", [N]" : "");
        goto done;
    }
    if (co != NULL) {
        classes = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
        if (classes == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            classes[i] = dtype_of(&cl) == DT_I64 ? ((const int64_t *)cl.buf)[i]
                                                 : ((const int32_t *)cl.buf)[i];
    }
    int64_t *tmp = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    if (tmp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t kept;
    Py_BEGIN_ALLOW_THREADS
    kept = run_nms((const float *)bx.buf, (const float *)sc.buf, classes, n, thr, plus1, tmp);
    if (plus1 && kept > 0) {  /* ascending index order, as the official ml_nms returns them */
        char *mark = (char *)calloc((size_t)n, 1);
        if (mark == NULL) {
            kept = -1;
        } else {
            for (Py_ssize_t k = 0; k < kept; k++)
                mark[tmp[k]] = 1;
            Py_ssize_t m = 0;
            for (Py_ssize_t i = 0; i < n; i++)
                if (mark[i])
                    tmp[m++] = i;
            free(mark);
        }
    }
    Py_END_ALLOW_THREADS
    if (kept >= 0) {
        keep = new_array(1, &kept, "int64", &kp);
        if (keep != NULL)
            memcpy(kp.buf, tmp, (size_t)kept * sizeof(int64_t));
    } else {
        PyErr_NoMemory();
    }
    free(tmp);
    result = keep;
done:
    free(classes);
    PyBuffer_Release(&bx);
    PyBuffer_Release(&sc);
    PyBuffer_Release(&cl);
    PyBuffer_Release(&kp);
    return result;
}

PyDoc_STRVAR(nms_doc,
"nms(boxes, scores, iou_threshold) -> int64 [K]\n\n"
"Greedy non-maximum suppression. boxes float32 [N, 4] xyxy, scores float32 [N]. A box is\n"
"dropped when its IoU with a kept, higher-ranked box is > iou_threshold. Returns the kept\n"
"indices by score descending (ties: lower index first; NaN scores last).");

static PyObject *py_nms(PyObject *self, PyObject *args)
{
    PyObject *bo, *so;
    double thr;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOd:nms", &bo, &so, &thr))
        return NULL;
    return nms_common(bo, so, NULL, thr, 0);
}

PyDoc_STRVAR(nms_per_class_doc,
"nms_per_class(boxes, scores, classes, iou_threshold) -> int64 [K]\n\n"
"nms() run independently per class (classes int32 or int64 [N]); boxes of different classes\n"
"never suppress each other. Returns kept indices over all classes by score descending.");

static PyObject *py_nms_per_class(PyObject *self, PyObject *args)
{
    PyObject *bo, *so, *co;
    double thr;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOd:nms_per_class", &bo, &so, &co, &thr))
        return NULL;
    return nms_common(bo, so, co, thr, 0);
}

PyDoc_STRVAR(ml_nms_doc,
"ml_nms(boxes, scores, labels, iou_threshold) -> int64 [K]\n\n"
"The official multi-label NMS (maskrcnn_benchmark _C.ml_nms, as FIBER/GLIP run it): greedy by\n"
"score descending (ties: lower index first; NaN last); a box is dropped when a kept,\n"
"higher-ranked box of the same label (labels int32/int64 [N], or None: all one label) has\n"
"IoU > iou_threshold, the IoU with the +1 pixel convention in float32\n"
"(w = min(x2) - max(x1) + 1, area = (x2 - x1 + 1)(y2 - y1 + 1)). Returns the kept indices in\n"
"ascending index order (the official order), not by score.");

static PyObject *py_ml_nms(PyObject *self, PyObject *args)
{
    PyObject *bo, *so, *co;
    double thr;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOd:ml_nms", &bo, &so, &co, &thr))
        return NULL;
    return nms_common(bo, so, co == Py_None ? NULL : co, thr, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* topk, decode_boxes                                                                         */

PyDoc_STRVAR(topk_doc,
"topk(scores, k) -> int64 [min(k, N)]\n\n"
"Indices of the k largest float32 scores [N], by score descending (ties: lower index first;\n"
"NaN last).");

static PyObject *py_topk(PyObject *self, PyObject *args)
{
    PyObject *so, *result = NULL;
    Py_ssize_t k;
    Py_buffer sc = {0}, out = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "On:topk", &so, &k))
        return NULL;
    if (k < 0) {
        PyErr_Format(PyExc_ValueError, "k must be >= 0, got %zd", k);
        return NULL;
    }
    if (get_array(so, "scores", &sc, DT_F32, 1, "float32", 0) < 0)
        return NULL;
    Py_ssize_t n = sc.shape[0];
    Py_ssize_t m = k < n ? k : n;
    int64_t *idx = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    if (idx == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = argsort_desc((const float *)sc.buf, n, idx);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = new_array(1, &m, "int64", &out);
    if (result != NULL)
        memcpy(out.buf, idx, (size_t)m * sizeof(int64_t));
done:
    free(idx);
    PyBuffer_Release(&sc);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(decode_boxes_doc,
"decode_boxes(boxes, scale, src_w, src_h) -> float32 [N, 4]\n\n"
"Map xyxy boxes float32 [N, 4] from network-input pixels of a top-left letterbox to source\n"
"pixels: x / scale (float32 division), clipped to [0, src_w] / [0, src_h]; NaN becomes 0.");

static PyObject *py_decode_boxes(PyObject *self, PyObject *args)
{
    PyObject *bo, *result = NULL;
    double scale;
    Py_ssize_t w, h;
    Py_buffer bx = {0}, out = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "Odnn:decode_boxes", &bo, &scale, &w, &h))
        return NULL;
    if (!(scale > 0.0) || !isfinite(scale) || w < 1 || h < 1) {
        PyErr_Format(PyExc_ValueError,
                     "need scale > 0 and src_w, src_h >= 1, got scale=%g src_w=%zd src_h=%zd",
                     scale, w, h);
        return NULL;
    }
    if (get_array(bo, "boxes", &bx, DT_F32, 2, "float32", 0) < 0)
        return NULL;
    if (bx.shape[1] != 4) {
        PyErr_Format(PyExc_ValueError, "boxes must be [N, 4], got [%zd, %zd]", bx.shape[0],
                     bx.shape[1]);
        goto done;
    }
    Py_ssize_t n = bx.shape[0];
    result = new_array(2, bx.shape, "float32", &out);
    if (result == NULL)
        goto done;
    const float *src = (const float *)bx.buf;
    float *dst = (float *)out.buf;
    float s = (float)scale, lim[4] = {(float)w, (float)h, (float)w, (float)h};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < 4 * n; i++) {
        float v = src[i] / s;
        float hi = lim[i & 3];
        dst[i] = v > 0.0f ? (v < hi ? v : hi) : 0.0f;
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&bx);
    PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"letterbox", (PyCFunction)(void (*)(void))py_letterbox, METH_VARARGS | METH_KEYWORDS,
     letterbox_doc},
    {"phrase_scores", py_phrase_scores, METH_VARARGS, phrase_scores_doc},
    {"nms", py_nms, METH_VARARGS, nms_doc},
    {"nms_per_class", py_nms_per_class, METH_VARARGS, nms_per_class_doc},
    {"ml_nms", py_ml_nms, METH_VARARGS, ml_nms_doc},
    {"topk", py_topk, METH_VARARGS, topk_doc},
    {"decode_boxes", py_decode_boxes, METH_VARARGS, decode_boxes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native",
    "The runtime's hot CPU paths (letterbox, phrase scores, NMS, top-k, box decode) in C.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
