/* The one compiled loop of int8pipe: a histogram of |x| for float32 activations.
 *
 * numpy needs four passes and a temporary for this (abs, scale, cast, bincount) and its bincount
 * serialises on the counter it increments: on ReLU outputs half the values land in bin 0, so each
 * increment waits for the previous one's store. Here one pass computes the bin and increments one
 * of four interleaved sub-histograms, so consecutive values never wait on each other.
 *
 * The arithmetic is numpy's, step for step, so both paths give identical counts (tested):
 *   bin = (int32) (fabsf(x) * inv_width)    float32 multiply, truncation toward zero
 *   bins past the end (values on the top edge or rounding past it) go to the last bin.
 * Non-finite values are rejected before this point (pipeline/calibration/calibrator.py).
 *
 * Built by setup.py as an optional extension: without a C compiler the numpy path is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 4

static inline Py_ssize_t bin_of(float x, float inv_width, Py_ssize_t bins)
{
    float y = fabsf(x) * inv_width;
    /* compare before converting: a float past the int range converts to an undefined value */
    return y < (float)bins ? (Py_ssize_t)y : bins - 1;
}

static void count_into(const float *x, Py_ssize_t n, float inv_width, int64_t *counts, Py_ssize_t bins)
{
    /* sub-histograms only pay off when the values outnumber the bins they must be merged from */
    if (n < 16 * bins) {
        for (Py_ssize_t i = 0; i < n; i++)
            counts[bin_of(x[i], inv_width, bins)]++;
        return;
    }
    int64_t *sub = calloc((size_t)(LANES * bins), sizeof(int64_t));
    if (sub == NULL) { /* no scratch memory: the plain loop still gives the right answer */
        for (Py_ssize_t i = 0; i < n; i++)
            counts[bin_of(x[i], inv_width, bins)]++;
        return;
    }
    int64_t *s0 = sub, *s1 = sub + bins, *s2 = sub + 2 * bins, *s3 = sub + 3 * bins;
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        Py_ssize_t a = bin_of(x[i], inv_width, bins), b = bin_of(x[i + 1], inv_width, bins);
        Py_ssize_t c = bin_of(x[i + 2], inv_width, bins), d = bin_of(x[i + 3], inv_width, bins);
        s0[a]++;
        s1[b]++;
        s2[c]++;
        s3[d]++;
    }
    for (; i < n; i++)
        s0[bin_of(x[i], inv_width, bins)]++;
    for (Py_ssize_t k = 0; k < bins; k++)
        counts[k] += s0[k] + s1[k] + s2[k] + s3[k];
    free(sub);
}

static int is_format(const Py_buffer *view, const char *allowed, Py_ssize_t itemsize)
{
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    return view->itemsize == itemsize && strlen(f) == 1 && strchr(allowed, *f) != NULL;
}

PyDoc_STRVAR(abs_histogram_doc,
    "abs_histogram(values, inv_width, counts)\n\n"
    "Add the histogram of |values| to counts: values is a C-contiguous float32 buffer, counts a\n"
    "writable C-contiguous int64 buffer (one entry per bin), bin k = int(|x| * inv_width), values\n"
    "past the last bin counted in the last bin. Releases the GIL.");

static PyObject *abs_histogram(PyObject *self, PyObject *args)
{
    PyObject *values_obj, *counts_obj;
    float inv_width;
    Py_buffer values, counts;
    if (!PyArg_ParseTuple(args, "OfO:abs_histogram", &values_obj, &inv_width, &counts_obj))
        return NULL;
    if (PyObject_GetBuffer(values_obj, &values, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (PyObject_GetBuffer(counts_obj, &counts, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t bins = counts.len / 8;
    if (!is_format(&values, "f", 4)) {
        PyErr_SetString(PyExc_TypeError, "abs_histogram: values must be a float32 buffer");
    } else if (!is_format(&counts, "lq", 8) || bins == 0) {
        PyErr_SetString(PyExc_TypeError, "abs_histogram: counts must be a non-empty int64 buffer");
    } else if (!(inv_width > 0.0f) || isinf(inv_width)) {
        PyErr_SetString(PyExc_ValueError, "abs_histogram: inv_width must be positive and finite");
    } else {
        const float *x = values.buf;
        int64_t *out = counts.buf;
        Py_ssize_t n = values.len / 4;
        Py_BEGIN_ALLOW_THREADS
        count_into(x, n, inv_width, out, bins);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&counts);
    return result;
}

static PyMethodDef methods[] = {
    {"abs_histogram", abs_histogram, METH_VARARGS, abs_histogram_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_histogram", "Compiled histogram kernel (see _histogram.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__histogram(void)
{
    return PyModule_Create(&module);
}
