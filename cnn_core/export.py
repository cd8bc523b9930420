"""Exporting a trained network as dependency-free C99 source code.

:func:`export_c` writes ``<name>.h`` and ``<name>.c``: the weights become ``static const``
tables (float32, or int8 with float scales), and two functions classify one input
vector with no allocation at all.  Every layer kind is written out: Dense, Conv2D (valid
or same padding, any stride), MaxPool2D, AvgPool2D, and Flatten and Dropout, which do
nothing at inference.  Activations pass through two buffers as wide as the widest layer,
sized at export: on the stack for networks of Dense layers (calls may then run in
several threads at once), in static storage for convolutional networks, whose images
would not fit the small stacks of microcontrollers (one call at a time there).  The
generated code needs only a C99 compiler and ``-lm``, so it builds for a microcontroller
as readily as for a desktop program::

    report = cnn_core.export.export_c(net, "firmware/model", name="digits",
                                      quantize="int8", X_check=X_test)
    print(report.agreement)      # share of X_check classified as net.predict does

    // C side
    #include "digits.h"
    int label = digits_predict(x);              // x: DIGITS_N_INPUTS floats
    float probs[DIGITS_N_CLASSES];
    digits_predict_proba(x, probs);

With ``quantize="int8"`` each weight matrix is stored as int8 with one float scale per
output unit or filter (or one per matrix with ``per_channel=False``): ``W ~= q * scale``,
``q`` in [-127, 127].  Inputs, biases, activations and arithmetic stay float32, so the tables
are four times smaller and the results close to the float network's; ``X_check`` lets
you measure how close.
"""
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import kernels, model_file

__all__ = ["export_c", "ExportReport"]

_C_KEYWORDS = frozenset(
    "auto break case char const continue default do double else enum extern float for "
    "goto if inline int long register restrict return short signed sizeof static struct "
    "switch typedef union unsigned void volatile while main".split())
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PER_LINE = 8       # values per line in the generated tables


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_c` wrote.

    header, source : paths of ``<name>.h`` and ``<name>.c``.
    quantize : None (float32 weights) or "int8"; per_channel : int8 scales per output unit.
    n_parameters : weights and biases exported.
    table_bytes : bytes of the constant tables (weights, biases, scales).
    stack_bytes : bytes of activations a predict call keeps on the stack.
    static_bytes : bytes of the static activation buffers (0 for networks of Dense
        layers, whose buffers are on the stack).
    max_weight_error : largest |W - q * scale| over all weights (0.0 for float32).
    n_checked : rows of X_check evaluated (0 without X_check).
    agreement : share of those rows on which the exported weights (run by cnn_core's
        own engine, int8 weights as q * scale) give the class ``network.predict``
        gives; None without X_check.
    """
    name: str
    header: Path
    source: Path
    quantize: Optional[str]
    per_channel: bool
    n_parameters: int
    table_bytes: int
    stack_bytes: int
    max_weight_error: float
    static_bytes: int = 0
    n_checked: int = 0
    agreement: Optional[float] = None

    def __str__(self):
        kind = "float32" if self.quantize is None else (
            f"int8 ({'per-channel' if self.per_channel else 'per-tensor'} scales)")
        text = (f"exported {self.name}: {self.n_parameters:,} parameters as {kind}, "
                f"{self.table_bytes:,} bytes of tables, {self.stack_bytes:,} bytes of stack")
        if self.static_bytes:
            text += f", {self.static_bytes:,} bytes of static buffers"
        if self.agreement is not None:
            text += f"; agrees with the network on {self.agreement:.2%} of {self.n_checked} rows"
        return text


# ---- quantization ------------------------------------------------------------------------

def _quantize(W, per_channel):
    """(q int8 of W's shape, scale float32 (outputs,) or (1,)) with W ~= q * scale; the
    outputs (units, filters) are W's last axis."""
    shape = W.shape
    W = W.reshape(-1, shape[-1])
    peak = np.abs(W).max(axis=0) if per_channel else np.abs(W).max().reshape(1)
    scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(W / scale), -127, 127).astype(np.int8)
    return q.reshape(shape), scale


# ---- C text ----------------------------------------------------------------------------

def _float_literal(v):
    """A C float literal that reads back as exactly the float32 v."""
    text = f"{float(v):.9g}"
    if not any(c in text for c in ".en"):
        text += ".0"
    return text + "f"


def _table(ctype, name, values, fmt):
    """A static const C array definition of the flat sequence values."""
    items = [fmt(v) for v in values]
    lines = [", ".join(items[i:i + _PER_LINE]) for i in range(0, len(items), _PER_LINE)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(items)}] = {{\n    {body}\n}};\n"


def _shape_text(shape):
    return "x".join(str(d) for d in shape)


_ACTIVATION_BODIES = {
    "relu": "        y[j] = y[j] > 0.0f ? y[j] : 0.0f;",
    "leaky_relu": "        y[j] = y[j] > 0.0f ? y[j] : slope * y[j];",
    "sigmoid": ("        if (y[j] >= 0.0f) {\n"
                "            y[j] = 1.0f / (1.0f + expf(-y[j]));\n"
                "        } else {\n"
                "            const float e = expf(y[j]);\n"
                "            y[j] = e / (1.0f + e);\n"
                "        }"),
    "tanh": "        y[j] = tanhf(y[j]);",
}


def _activation_function(activation):
    """The generated C function applying `activation` in place (not identity)."""
    slope = ", float slope" if activation == "leaky_relu" else ""
    return (f"static void activate_{activation}(float *y, size_t n{slope})\n{{\n"
            f"    /* y (n,) = {activation}(y) */\n"
            f"    for (size_t j = 0; j < n; ++j) {{\n{_ACTIVATION_BODIES[activation]}\n"
            f"    }}\n}}\n")


_DENSE_FLOAT = """\
static void dense(float *y, const float *x, const float *W, const float *b,
                  size_t n_in, size_t n_out)
{
    /* y = x W + b ; x (n_in,), W (n_in, n_out) row-major, b (n_out,), y (n_out,) */
    for (size_t j = 0; j < n_out; ++j)
        y[j] = 0.0f;
    for (size_t i = 0; i < n_in; ++i) {
        const float xi = x[i];
        const float *w = W + i * n_out;
        for (size_t j = 0; j < n_out; ++j)
            y[j] += xi * w[j];
    }
    for (size_t j = 0; j < n_out; ++j)
        y[j] += b[j];
}
"""

_DENSE_INT8 = """\
static void dense(float *y, const float *x, const int8_t *Q, const float *scale,
                  size_t scale_step, const float *b, size_t n_in, size_t n_out)
{
    /* y = (x Q) * scale + b ; x (n_in,), Q (n_in, n_out) row-major int8, scale
       (n_out,) with scale_step 1 or (1,) with scale_step 0, b (n_out,), y (n_out,) */
    for (size_t j = 0; j < n_out; ++j)
        y[j] = 0.0f;
    for (size_t i = 0; i < n_in; ++i) {
        const float xi = x[i];
        const int8_t *q = Q + i * n_out;
        for (size_t j = 0; j < n_out; ++j)
            y[j] += xi * (float)q[j];
    }
    for (size_t j = 0; j < n_out; ++j)
        y[j] = y[j] * scale[j * scale_step] + b[j];
}
"""

_CONV_SHAPE = """\
/* One convolution's geometry: input (in_h, in_w, in_c), output (out_h, out_w, out_c),
   kernel k_h x k_w moved by stride, pad_top / pad_left rows and columns of zeros. */
typedef struct conv_shape {
    size_t in_h, in_w, in_c, out_h, out_w, out_c, k_h, k_w, stride, pad_top, pad_left;
} conv_shape;
"""

_CONV = """\
static void conv2d(float *y, const float *x, const {wtype} *W, {scale_args}const float *b,
                   const conv_shape *s)
{{
    /* y (out_h, out_w, out_c) = {formula} ; the sum runs over each window of
       x (in_h, in_w, in_c) with W (k_h, k_w, in_c, out_c), zeros outside x; images are
       row-major, channels last */
    for (size_t oy = 0; oy < s->out_h; ++oy) {{
        for (size_t ox = 0; ox < s->out_w; ++ox) {{
            float *o = y + (oy * s->out_w + ox) * s->out_c;
            for (size_t j = 0; j < s->out_c; ++j)
                o[j] = 0.0f;
            for (size_t ky = 0; ky < s->k_h; ++ky) {{
                const size_t iy = oy * s->stride + ky;      /* row of the padded image */
                if (iy < s->pad_top || iy - s->pad_top >= s->in_h)
                    continue;
                for (size_t kx = 0; kx < s->k_w; ++kx) {{
                    const size_t ix = ox * s->stride + kx;
                    if (ix < s->pad_left || ix - s->pad_left >= s->in_w)
                        continue;
                    const float *xi = x + ((iy - s->pad_top) * s->in_w + ix - s->pad_left)
                                              * s->in_c;
                    const {wtype} *w = W + (ky * s->k_w + kx) * s->in_c * s->out_c;
                    for (size_t c = 0; c < s->in_c; ++c) {{
                        const float v = xi[c];
                        for (size_t j = 0; j < s->out_c; ++j)
                            o[j] += v * {cast}w[c * s->out_c + j];
                    }}
                }}
            }}
            for (size_t j = 0; j < s->out_c; ++j)
                {finish}
        }}
    }}
}}
"""

_POOL_SHAPE = """\
/* One pooling layer's geometry: input (in_h, in_w, channels), output (out_h, out_w,
   channels), size x size windows moved by stride. */
typedef struct pool_shape {
    size_t in_h, in_w, channels, out_h, out_w, size, stride;
} pool_shape;
"""

_POOL = """\
static void {kind}(float *y, const float *x, const pool_shape *s)
{{
    /* y (out_h, out_w, channels) = the {what} of each window of x (in_h, in_w, channels) */
    const size_t C = s->channels;
    for (size_t oy = 0; oy < s->out_h; ++oy) {{
        for (size_t ox = 0; ox < s->out_w; ++ox) {{
            float *o = y + (oy * s->out_w + ox) * C;
            const float *corner = x + (oy * s->stride * s->in_w + ox * s->stride) * C;
            for (size_t c = 0; c < C; ++c)
                o[c] = {start};
            for (size_t ky = 0; ky < s->size; ++ky) {{
                for (size_t kx = 0; kx < s->size; ++kx) {{
                    const float *xi = corner + (ky * s->in_w + kx) * C;
                    for (size_t c = 0; c < C; ++c)
                        {step}
                }}
            }}{finish}
        }}
    }}
}}
"""

_COMMON = """\
static int argmax(const float *v, size_t n)
{
    /* index of the first largest value of v (n,), or of its first NaN */
    size_t best = 0;
    for (size_t j = 0; j < n; ++j) {
        if (v[j] != v[j])
            return (int)j;
        if (v[j] > v[best])
            best = j;
    }
    return (int)best;
}

static void softmax(float *v, size_t n)
{
    /* v (n,) = exp(v - max v) / sum exp(v - max v) */
    float m = v[0];
    for (size_t j = 1; j < n; ++j)
        m = v[j] > m ? v[j] : m;
    double s = 0.0;
    for (size_t j = 0; j < n; ++j) {
        v[j] = expf(v[j] - m);
        s += v[j];
    }
    const float inv = (float)(1.0 / s);
    for (size_t j = 0; j < n; ++j)
        v[j] *= inv;
}
"""


def _conv_function(quantized):
    if quantized:
        return _CONV.format(wtype="int8_t", scale_args="const float *scale, size_t scale_step,\n"
                                                       "                   ",
                            formula="(sum of x Q) * scale + b", cast="(float)",
                            finish="o[j] = o[j] * scale[j * scale_step] + b[j];")
    return _CONV.format(wtype="float", scale_args="", formula="b + sum of x W", cast="",
                        finish="o[j] += b[j];")


def _pool_function(kind):
    if kind == "maxpool2d":
        return _POOL.format(kind=kind, what="maximum", start="corner[c]",
                            step="o[c] = xi[c] > o[c] ? xi[c] : o[c];", finish="")
    return _POOL.format(kind=kind, what="mean", start="0.0f", step="o[c] += xi[c];",
                        finish="\n            for (size_t c = 0; c < C; ++c)\n"
                               "                o[c] /= (float)(s->size * s->size);")


def _plan(stack, tables, macro):
    """The lines of forward()'s body, the shape constants, and (buffer floats, whether
    the buffers are static) for the built layers `stack`; tables[k] is (W or q, b,
    scale or None) of the k-th layer with parameters."""
    computing = [i for i, layer in enumerate(stack) if i and layer.kind not in
                 ("flatten", "dropout")]
    widest = max((math.prod(stack[i].output_shape()) for i in computing[:-1]), default=0)
    images = any(stack[i].kind != "dense" for i in computing)
    lines, constants, source, k = [], [], "x", 0
    for i in computing:
        layer = stack[i]
        shape_in, shape_out = layer.input_shape, layer.output_shape()
        target = "out" if i == computing[-1] else ("act_b" if source == "act_a" else "act_a")
        lines.append(f"    /* layer {i}, {layer!r}: {_shape_text(shape_in)} -> "
                     f"{_shape_text(shape_out)} */")
        if layer.kind in ("dense", "conv2d"):
            W, _, scale = tables[k]
            if scale is None:
                weights = f"W{k}, B{k}"
            else:
                weights = f"Q{k}, S{k}, {1 if scale.shape[0] > 1 else 0}, B{k}"
            if layer.kind == "dense":
                lines.append(f"    dense({target}, {source}, {weights}, {shape_in[0]}, "
                             f"{shape_out[0]});")
            else:
                top, _, left, _ = layer.padding_amounts(shape_in)
                kh, kw = layer.kernel_size
                constants.append(
                    f"static const conv_shape CONV{i} = {{ {shape_in[0]}, {shape_in[1]}, "
                    f"{shape_in[2]}, {shape_out[0]}, {shape_out[1]}, {shape_out[2]}, {kh}, "
                    f"{kw}, {layer.stride}, {top}, {left} }};\n")
                lines.append(f"    conv2d({target}, {source}, {weights}, &CONV{i});")
            k += 1
            if layer.activation != "identity":
                slope = (f", {_float_literal(layer.leaky_slope)}"
                         if layer.activation == "leaky_relu" else "")
                lines.append(f"    activate_{layer.activation}({target}, "
                             f"{math.prod(shape_out)}{slope});")
        else:
            constants.append(
                f"static const pool_shape POOL{i} = {{ {shape_in[0]}, {shape_in[1]}, "
                f"{shape_in[2]}, {shape_out[0]}, {shape_out[1]}, {layer.size}, "
                f"{layer.stride} }};\n")
            lines.append(f"    {layer.kind}({target}, {source}, &POOL{i});")
        source = target
    lines.append(f"    return argmax(out, {macro}_N_CLASSES);")
    n_buffers = min(len(computing) - 1, 2)
    return lines, constants, (n_buffers, widest), images


def _source_text(name, stack, tables, kind):
    macro = name.upper()
    quantized = tables[0][2] is not None
    kinds = {layer.kind for layer in stack[1:]}
    activations = sorted({layer.activation for layer in stack[1:]
                          if getattr(layer, "activation", "identity") != "identity"})
    lines, constants, (n_buffers, widest), images = _plan(stack, tables, macro)
    parts = [f"/* {name}.c -- generated by cnn_core.export.export_c: {kind}; "
             f"see {name}.h. */\n"
             "#include <math.h>\n#include <stddef.h>\n#include <stdint.h>\n"
             f'#include "{name}.h"\n']
    k = 0
    for i, layer in enumerate(stack[1:], 1):
        if layer.kind not in ("dense", "conv2d"):
            continue
        W, b, scale = tables[k]
        parts.append(f"/* layer {i}, {layer!r}: W {_shape_text(W.shape)}, b {b.size} */\n")
        if quantized:
            parts.append(_table("int8_t", f"Q{k}", W.ravel(), str))
            parts.append(_table("float", f"S{k}", scale, _float_literal))
        else:
            parts.append(_table("float", f"W{k}", W.ravel(), _float_literal))
        parts.append(_table("float", f"B{k}", b, _float_literal))
        k += 1
    if "conv2d" in kinds:
        parts += [_CONV_SHAPE, _conv_function(quantized)]
    if kinds & {"maxpool2d", "avgpool2d"}:
        parts.append(_POOL_SHAPE)
        parts += [_pool_function(p) for p in ("maxpool2d", "avgpool2d") if p in kinds]
    if constants:
        parts.append("".join(constants))
    if "dense" in kinds:
        parts.append(_DENSE_INT8 if quantized else _DENSE_FLOAT)
    parts += [_activation_function(a) for a in activations]
    parts.append(_COMMON)
    buffers = ", ".join(f"act_{v}[{widest}]" for v in "ab"[:n_buffers])
    body = ["static int forward(const float *x, float *out)", "{",
            f"    /* out ({macro}_N_CLASSES,) = the network's outputs for x "
            f"({macro}_N_INPUTS,);\n       returns their argmax */"]
    if buffers and images:
        parts.append(f"/* the activations between layers (static: see {name}.h) */\n"
                     f"static float {buffers};\n")
    elif buffers:
        body.append(f"    float {buffers};")
    parts.append("\n".join(body + lines + ["}", ""]))
    parts.append(f"""\
int {name}_predict(const float *x)
{{
    /* class of x ({macro}_N_INPUTS,) */
    float out[{macro}_N_CLASSES];
    return forward(x, out);
}}

int {name}_predict_proba(const float *x, float *probs)
{{
    /* probs ({macro}_N_CLASSES,) = softmax of the outputs for x ({macro}_N_INPUTS,) */
    const int k = forward(x, probs);
    softmax(probs, {macro}_N_CLASSES);
    return k;
}}
""")
    return "\n".join(parts)


def _memory(stack):
    """(stack bytes, static bytes) of a predict call of the exported network."""
    computing = [layer for layer in stack[1:] if layer.kind not in ("flatten", "dropout")]
    widest = max((math.prod(layer.output_shape()) for layer in computing[:-1]), default=0)
    buffers = 4 * min(len(computing) - 1, 2) * widest
    out = 4 * stack[-1].units
    if any(layer.kind != "dense" for layer in computing):
        return out, buffers
    return buffers + out, 0


def _header_text(name, stack, kind, stack_bytes, static_bytes):
    guard = f"{name.upper()}_H"
    macro = name.upper()
    arch = " -> ".join(repr(layer) for layer in stack)
    shape = stack[0].shape
    if static_bytes:
        memory = (f"No allocation: the activations pass through {macro}_STATIC_BYTES\n"
                  f"   bytes of static buffers, so calls must not overlap (one thread at a "
                  f"time);\n   a call keeps {macro}_STACK_BYTES bytes on the stack.")
    else:
        memory = (f"No allocation and no global state: a call keeps at most\n"
                  f"   {macro}_STACK_BYTES bytes of activations on the stack, and calls may "
                  f"run in\n   several threads at once.")
    layout = "" if len(shape) == 1 else (
        f"\n   An input is a {shape[0]}x{shape[1]} image with {shape[2]} channel"
        f"{'s' if shape[2] > 1 else ''}: its pixels row by row, channels last.")
    static = f"#define {macro}_STATIC_BYTES {static_bytes}\n" if static_bytes else ""
    return f"""\
/* {name}.h -- a cnn_core network exported as dependency-free C99: {kind}.
   Layers: {arch}.{layout}
   Generated by cnn_core.export.export_c; compile {name}.c with any C99 compiler and
   link with -lm.  {memory} */
#ifndef {guard}
#define {guard}

#ifdef __cplusplus
extern "C" {{
#endif

#define {macro}_N_INPUTS {math.prod(shape)}
#define {macro}_N_CLASSES {stack[-1].units}
#define {macro}_STACK_BYTES {stack_bytes}
{static}
/* Predicted class in [0, {macro}_N_CLASSES) for one input x ({macro}_N_INPUTS floats,
   scaled as in training, e.g. pixels / 255): the first largest output. */
int {name}_predict(const float *x);

/* probs ({macro}_N_CLASSES,) = softmax of the network's outputs for x
   ({macro}_N_INPUTS,); returns the predicted class, as {name}_predict does. */
int {name}_predict_proba(const float *x, float *probs);

#ifdef __cplusplus
}}
#endif
#endif /* {guard} */
"""


# ---- the public function ---------------------------------------------------------------

def _network_parts(network):
    """(built layers, weights, biases) of a Network, checked."""
    try:
        stack, loss = list(network.layers), network.loss
        weights = [np.asarray(W, dtype=np.float32) for W in network.weights]
        biases = [np.asarray(b, dtype=np.float32) for b in network.biases]
    except AttributeError:
        raise TypeError(f"network must be a cnn_core.Network, got "
                        f"{type(network).__name__}") from None
    if loss != "cross_entropy":
        raise ValueError(f"export_c writes classifiers (loss='cross_entropy'); this "
                         f"network's loss is {loss!r}")
    for W, b in zip(weights, biases):
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise ValueError("cannot export a network with NaN or infinite weights")
    return stack, weights, biases


def _agreement(network, stack, tables, X_check):
    """(rows, share of them) on which the exported weights, run by cnn_core's engine,
    give the class network.predict gives."""
    X = network._check_X(X_check, "X_check")    # errors name X_check, not X
    expected = np.asarray(network.predict(X))
    params = []
    for W, b, scale in tables:
        params += [W.ravel() if scale is None else (W.astype(np.float32) * scale).ravel(), b]
    flat = np.concatenate(params)
    exported = kernels._workspace(flat.size)
    exported[:] = flat
    got = kernels._Net(stack, "cross_entropy", exported).predict_labels(
        X, kernels._threads(None))
    return len(X), float((got == expected).mean())


def export_c(network, folder, *, name="cnn_model", quantize=None, per_channel=True,
             X_check=None):
    """Write ``<name>.h`` and ``<name>.c``: the network as dependency-free C99 code.

    network : a trained :class:`cnn_core.Network` classifier (any layer stack).
    folder : where to write (created if missing); each file is written atomically.
    name : a C identifier prefixing every exported symbol (``<name>_predict``,
        ``<name>_predict_proba``, ``<NAME>_N_INPUTS``, ``<NAME>_N_CLASSES``).
    quantize : None for float32 weights, or "int8" for int8 weights with float scales.
    per_channel : with int8, one scale per output unit or filter (default) or one per
        weight tensor.
    X_check : optional rows (n, n_features), or images as ``network.predict`` takes them
        (float, or uint8 pixels scaled by 1/255 as the Network does), on which to
        measure ``report.agreement``: the share of rows the exported model classifies
        as ``network.predict`` does.

    Returns an :class:`ExportReport`.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or name in _C_KEYWORDS:
        raise ValueError(f"name must be a C identifier like 'cnn_model', got {name!r}")
    stack, weights, biases = _network_parts(network)

    tables, max_error, table_bytes = [], 0.0, 0
    for W, b in zip(weights, biases):
        if quantize == "int8":
            q, scale = _quantize(W, per_channel)
            error = np.abs(W - q.astype(np.float32) * scale).max(initial=0.0)
            max_error = max(max_error, float(error))
            tables.append((q, b, scale))
            table_bytes += q.size + 4 * (scale.size + b.size)
        else:
            tables.append((W, b, None))
            table_bytes += 4 * (W.size + b.size)

    n_checked, agreement = 0, None
    if X_check is not None:
        n_checked, agreement = _agreement(network, stack, tables, X_check)

    kind = "float32 weights" if quantize is None else (
        f"int8 weights, one float scale per "
        f"{'output unit or filter' if per_channel else 'weight tensor'}")
    stack_bytes, static_bytes = _memory(stack)
    folder = Path(os.fsdecode(folder))
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; export_c writes {name}.h and "
                                 f"{name}.c into a folder: give the folder's path")
    folder.mkdir(parents=True, exist_ok=True)
    header, source = folder / f"{name}.h", folder / f"{name}.c"
    model_file.write_atomic(source, _source_text(name, stack, tables, kind).encode())
    model_file.write_atomic(header, _header_text(name, stack, kind, stack_bytes,
                                                 static_bytes).encode())
    return ExportReport(name=name, header=header, source=source, quantize=quantize,
                        per_channel=bool(per_channel) if quantize else False,
                        n_parameters=int(sum(W.size + b.size for W, b in zip(weights, biases))),
                        table_bytes=table_bytes, stack_bytes=stack_bytes,
                        static_bytes=static_bytes, max_weight_error=max_error,
                        n_checked=n_checked, agreement=agreement)
