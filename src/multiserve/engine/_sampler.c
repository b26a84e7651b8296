/* Samples the next token of every choice of one decode step from llama.cpp's logits, in one call.
 *
 * Why native code: llama.cpp's sampler chain copies the whole vocabulary (262,144 candidates on
 * Gemma 3) into a candidate array for every sequence and runs scalar expf over it, which costs
 * about as much as a quarter of a decode step at 8 streams. Here each row is read in place, the
 * softmax uses a polynomial exp the compiler vectorises (AVX2/AVX-512 clones on x86, NEON on Arm),
 * and block sums make the inverse-CDF search touch one block twice instead of the vocabulary.
 *
 * Semantics follow the llama.cpp chain multiserve used before (logit_bias, penalties, top_k,
 * top_p, min_p, temperature, dist): filters act on untempered logits, temperature last, and the
 * draw is exact inverse-CDF sampling over every kept token (no truncation). Bias and penalties
 * arrive precomputed as per-row logit overrides. A row's result depends only on that row, its
 * parameters and its uniform draw, so it is the same alone or in any batch.
 *
 * Built with -ffinite-math-only (the loops vectorise only without NaN/inf semantics): logits are
 * finite, and no infinity appears in this file (FLT_MAX stands for "no cut").
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && __GNUC__ >= 11
#define MULTIVERSIONED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSIONED
#endif
#define INLINE static inline __attribute__((always_inline))

enum { BLOCK = 1024 };

/* How far below the maximum logit the filters look for candidates before taking the whole row:
 * on real models nearly every top_k or top_p set lies within the first width. */
static const float WIDTHS[] = {8.0f, 16.0f, 32.0f, 64.0f, FLT_MAX};
enum { N_WIDTHS = sizeof WIDTHS / sizeof WIDTHS[0] };

/* exp(x) for x <= 0 within 2 ulp (Cephes' expf polynomial); branch-free so loops vectorise. */
INLINE float exp_nonpositive(float x) {
    x = fmaxf(x, -87.0f);
    const float y = x * 1.44269504088896341f;
    const int32_t n = (int32_t)(y - 0.5f); /* round half away from zero, y <= 0 */
    const float fn = (float)n;
    float r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const union {
        int32_t bits;
        float value;
    } scale = {.bits = (n + 127) << 23};
    return p * scale.value;
}

MULTIVERSIONED __attribute__((noinline)) static float row_max(const float *restrict x, int n) {
    float m = -FLT_MAX;
#pragma omp simd reduction(max : m)
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static int row_argmax(const float *x, int n) {
    const float m = row_max(x, n);
    for (int i = 0; i < n; i++)
        if (x[i] == m) return i;
    return 0;
}

/* Sum of exp((x - m) * inv_t) over x >= cut, for x[0..n), n <= BLOCK. The hot loop: kept out of
 * line so it vectorises and gets one clone per x86 level. With a cut the exps go through a
 * buffer, because compilers will not vectorise a select around an inlined exp. */
MULTIVERSIONED __attribute__((noinline)) static float block_mass(const float *restrict x, int n,
                                                                 float m, float inv_t, float cut) {
    float s = 0.0f;
    if (cut <= -FLT_MAX) {
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < n; i++) s += exp_nonpositive((x[i] - m) * inv_t);
        return s;
    }
    float e[BLOCK];
#pragma omp simd
    for (int i = 0; i < n; i++) e[i] = exp_nonpositive((x[i] - m) * inv_t);
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += x[i] >= cut ? e[i] : 0.0f;
    return s;
}

static int descending(const void *a, const void *b) {
    const float fa = *(const float *)a, fb = *(const float *)b;
    return (fa < fb) - (fa > fb);
}

/* The k-th largest value of x (k >= 1): candidates above a rising threshold, then a sort. */
static float kth_largest(const float *x, int n, int k, float m, float *work) {
    int count = 0;
    for (int w = 0; w < N_WIDTHS && count < k; w++) {
        const float floor_ = m - WIDTHS[w];
        count = 0;
        for (int i = 0; i < n; i++)
            if (x[i] >= floor_) work[count++] = x[i];
    }
    qsort(work, (size_t)count, sizeof *work, descending);
    return work[(count < k ? count : k) - 1];
}

/* Lowest logit kept by top_p among tokens >= cut (llama.cpp: keep the most likely tokens until
 * their mass reaches p, the crossing token included). Candidates are gathered above a rising
 * threshold until they alone hold the mass, so only they are sorted. */
static float top_p_cut(const float *x, int n, float m, float cut, float p, float *work) {
    double total = 0.0;
    for (int start = 0; start < n; start += BLOCK) {
        const int len = n - start < BLOCK ? n - start : BLOCK;
        total += block_mass(x + start, len, m, 1.0f, cut);
    }
    const double target = (double)p * total;
    int count = 0;
    double mass = 0.0;
    for (int w = 0; w < N_WIDTHS && !(mass >= target && count > 0); w++) {
        const float floor_ = fmaxf(cut, m - WIDTHS[w]);
        count = 0;
        mass = 0.0;
        for (int i = 0; i < n; i++)
            if (x[i] >= floor_) {
                work[count++] = x[i];
                mass += exp_nonpositive(x[i] - m);
            }
    }
    qsort(work, (size_t)count, sizeof *work, descending);
    double run = 0.0;
    for (int i = 0; i < count; i++) {
        run += exp_nonpositive(work[i] - m);
        if (run >= target) return work[i];
    }
    return count ? work[count - 1] : m;
}

typedef struct {
    float temperature; /* <= 0: greedy */
    int32_t top_k;     /* <= 0: off */
    float top_p;       /* >= 1: off */
    float min_p;       /* <= 0: off */
    double uniform;    /* in [0, 1) */
} RowParams;

static int sample_row(const float *x, int n, RowParams prm, float *work) {
    if (prm.temperature <= 0.0f) return row_argmax(x, n);
    const float m = row_max(x, n);
    /* the chain's order: top_k, then top_p among what top_k kept, then min_p; each keeps the
     * tokens at or above a logit, so together they keep those at or above the highest cut */
    float cut = -FLT_MAX;
    if (prm.top_k > 0 && prm.top_k < n) cut = kth_largest(x, n, prm.top_k, m, work);
    if (prm.top_p < 1.0f) cut = fmaxf(cut, top_p_cut(x, n, m, cut, prm.top_p, work));
    if (prm.min_p > 0.0f) cut = fmaxf(cut, m + logf(prm.min_p));

    const float inv_t = 1.0f / prm.temperature;
    const int n_blocks = (n + BLOCK - 1) / BLOCK;
    double *block = (double *)work; /* work holds n floats; n_blocks doubles fit easily */
    double total = 0.0;
    for (int b = 0; b < n_blocks; b++) {
        const int start = b * BLOCK, len = n - start < BLOCK ? n - start : BLOCK;
        block[b] = block_mass(x + start, len, m, inv_t, cut);
        total += block[b];
    }
    const double target = prm.uniform * total;
    double run = 0.0;
    int last_kept = -1;
    for (int b = 0; b < n_blocks; b++) {
        if (block[b] > 0.0) {
            if (run + block[b] <= target && b + 1 < n_blocks) {
                run += block[b];
                continue;
            }
            const int start = b * BLOCK, end = start + (n - start < BLOCK ? n - start : BLOCK);
            for (int i = start; i < end; i++) {
                if (x[i] < cut) continue;
                last_kept = i;
                run += exp_nonpositive((x[i] - m) * inv_t);
                if (run > target) return i;
            }
        }
    }
    /* rounding left the draw past the last kept token: it is the answer */
    return last_kept >= 0 ? last_kept : row_argmax(x, n);
}

typedef struct {
    Py_buffer view;
    int held;
} Buffer;

static int get_buffer(PyObject *obj, Buffer *buf, Py_ssize_t item, Py_ssize_t count,
                      const char *name, int writable) {
    if (PyObject_GetBuffer(obj, &buf->view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    buf->held = 1;
    if (buf->view.itemsize != item || buf->view.len < item * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes", name, count, item);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(sample_doc,
             "sample(logits, n_vocab, rows, temperature, top_k, top_p, min_p, uniform, "
             "override_offsets, override_ids, override_values, out)\n\n"
             "Draw one token per choice. logits: float32 [n_outputs * n_vocab]; rows: int32 output "
             "row per choice; temperature/top_p/min_p: float32; top_k: int32; uniform: float64 in "
             "[0, 1); override_offsets: int32 [k + 1] into override_ids (int32) and override_values "
             "(float32), the logits to use instead for bias and penalties; out: int32 [k].");

static PyObject *sample(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *objs[11];
    Py_ssize_t n_vocab;
    if (!PyArg_ParseTuple(args, "OnOOOOOOOOOO", &objs[0], &n_vocab, &objs[1], &objs[2], &objs[3],
                          &objs[4], &objs[5], &objs[6], &objs[7], &objs[8], &objs[9], &objs[10]))
        return NULL;
    Buffer b[11];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    float *work = NULL;
    if (n_vocab <= 0 || n_vocab > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "n_vocab out of range");
        return NULL;
    }
    if (get_buffer(objs[1], &b[1], 4, 0, "rows", 0) < 0) goto done;
    const Py_ssize_t k = b[1].view.len / 4;
    if (get_buffer(objs[0], &b[0], 4, 0, "logits", 0) < 0 ||
        get_buffer(objs[2], &b[2], 4, k, "temperature", 0) < 0 ||
        get_buffer(objs[3], &b[3], 4, k, "top_k", 0) < 0 ||
        get_buffer(objs[4], &b[4], 4, k, "top_p", 0) < 0 ||
        get_buffer(objs[5], &b[5], 4, k, "min_p", 0) < 0 ||
        get_buffer(objs[6], &b[6], 8, k, "uniform", 0) < 0 ||
        get_buffer(objs[7], &b[7], 4, k + 1, "override_offsets", 0) < 0 ||
        get_buffer(objs[8], &b[8], 4, 0, "override_ids", 0) < 0 ||
        get_buffer(objs[9], &b[9], 4, b[8].view.len / 4, "override_values", 0) < 0 ||
        get_buffer(objs[10], &b[10], 4, k, "out", 1) < 0)
        goto done;

    const float *logits = b[0].view.buf;
    const Py_ssize_t n_rows = b[0].view.len / 4 / n_vocab;
    const int32_t *rows = b[1].view.buf, *top_k = b[3].view.buf, *offsets = b[7].view.buf;
    const int32_t *ov_ids = b[8].view.buf;
    const float *temp = b[2].view.buf, *top_p = b[4].view.buf, *min_p = b[5].view.buf;
    const float *ov_vals = b[9].view.buf;
    const double *uniform = b[6].view.buf;
    int32_t *out = b[10].view.buf;
    const Py_ssize_t n_overrides = b[8].view.len / 4;
    for (Py_ssize_t r = 0; r < k; r++) {
        if (rows[r] < 0 || rows[r] >= n_rows || offsets[r] < 0 || offsets[r] > offsets[r + 1] ||
            offsets[r + 1] > n_overrides) {
            PyErr_SetString(PyExc_ValueError, "row or override offsets out of range");
            goto done;
        }
        for (int32_t j = offsets[r]; j < offsets[r + 1]; j++)
            if (ov_ids[j] < 0 || ov_ids[j] >= n_vocab) {
                PyErr_SetString(PyExc_ValueError, "override token id out of range");
                goto done;
            }
    }
    /* one row copy (for overrides) plus the work area of filters and block sums */
    work = malloc(sizeof(float) * 2 * (size_t)n_vocab);
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t r = 0; r < k; r++) {
        const float *row = logits + (size_t)rows[r] * (size_t)n_vocab;
        if (offsets[r] < offsets[r + 1]) {
            float *copy = work + n_vocab;
            memcpy(copy, row, sizeof(float) * (size_t)n_vocab);
            for (int32_t j = offsets[r]; j < offsets[r + 1]; j++) copy[ov_ids[j]] = ov_vals[j];
            row = copy;
        }
        const RowParams prm = {temp[r], top_k[r], top_p[r], min_p[r], uniform[r]};
        out[r] = sample_row(row, (int)n_vocab, prm, work);
    }
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    free(work);
    for (int i = 0; i < 11; i++)
        if (b[i].held) PyBuffer_Release(&b[i].view);
    return result;
}

static PyMethodDef methods[] = {
    {"sample", sample, METH_VARARGS, sample_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sampler",
    "Batched exact token sampling over full vocabularies (see _sampler.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__sampler(void) { return PyModule_Create(&module); }
