"""Exporting a trained network as dependency-free C99 source code.

:func:`export_c` writes ``<name>.h`` and ``<name>.c``: the weights become ``static const``
tables (float32, or int8 with float scales), and two functions classify one input
vector with no allocation at all, using two stack buffers as wide as the widest hidden
layer.  The generated code needs only a C99 compiler and ``-lm``, so it builds for a
microcontroller as readily as for a desktop program::

    report = cnn_core.export.export_c(net, "firmware/model", name="digits",
                                      quantize="int8", X_check=X_test)
    print(report.agreement)      # share of X_check classified as net.predict does

    // C side
    #include "digits.h"
    int label = digits_predict(x);              // x: DIGITS_N_INPUTS floats
    float probs[DIGITS_N_CLASSES];
    digits_predict_proba(x, probs);

With ``quantize="int8"`` each weight matrix is stored as int8 with one float scale per
output unit (or one per matrix with ``per_channel=False``): ``W ~= q * scale``, ``q`` in
[-127, 127].  Inputs, biases, activations and arithmetic stay float32, so the tables
are four times smaller and the results close to the float network's; ``X_check`` lets
you measure how close.
"""
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
    max_weight_error : largest |W - q * scale| over all weights (0.0 for float32).
    n_checked : rows of X_check evaluated (0 without X_check).
    agreement : share of those rows on which the exported model (evaluated in numpy
        with exactly the exported weights) predicts the class ``network.predict``
        predicts; None without X_check.
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
    n_checked: int = 0
    agreement: Optional[float] = None

    def __str__(self):
        kind = "float32" if self.quantize is None else (
            f"int8 ({'per-channel' if self.per_channel else 'per-tensor'} scales)")
        text = (f"exported {self.name}: {self.n_parameters:,} parameters as {kind}, "
                f"{self.table_bytes:,} bytes of tables, {self.stack_bytes:,} bytes of stack")
        if self.agreement is not None:
            text += f"; agrees with the network on {self.agreement:.2%} of {self.n_checked} rows"
        return text


# ---- quantization and the numpy model of the generated code ------------------------------

def _quantize(W, per_channel):
    """(q int8 (n_in, n_out), scale float32 (n_out,) or (1,)) with W ~= q * scale."""
    peak = np.abs(W).max(axis=0) if per_channel else np.abs(W).max().reshape(1)
    scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(W / scale), -127, 127).astype(np.int8)
    return q, scale


def _activate(Z, activation, slope):
    """The hidden activation on a float32 array (as the generated C computes it)."""
    if activation == "relu":
        return np.maximum(Z, np.float32(0))
    if activation == "leaky_relu":
        return np.where(Z > 0, Z, np.float32(slope) * Z)
    if activation == "sigmoid":
        with np.errstate(over="ignore"):
            return (1 / (1 + np.exp(-Z))).astype(np.float32)
    if activation == "tanh":
        return np.tanh(Z)
    return Z


def _emulate(layers, activation, slope, X):
    """Logits float32 (n, n_classes) of the exported layers on X float32 (n, n_inputs)."""
    h = X
    for l, (W, b, scale) in enumerate(layers):
        if scale is None:
            h = h @ W + b
        else:
            h = (h @ W.astype(np.float32)) * scale + b
        if l + 1 < len(layers):
            h = _activate(h, activation, slope)
    return h


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


def _activation_c(activation, slope):
    """Body of the generated `activate` function for the hidden activation."""
    if activation == "relu":
        return "        y[j] = y[j] > 0.0f ? y[j] : 0.0f;"
    if activation == "leaky_relu":
        return f"        y[j] = y[j] > 0.0f ? y[j] : {_float_literal(slope)} * y[j];"
    if activation == "sigmoid":
        return ("        if (y[j] >= 0.0f) {\n"
                "            y[j] = 1.0f / (1.0f + expf(-y[j]));\n"
                "        } else {\n"
                "            float e = expf(y[j]);\n"
                "            y[j] = e / (1.0f + e);\n"
                "        }")
    if activation == "tanh":
        return "        y[j] = tanhf(y[j]);"
    return None


def _header_text(name, sizes, activation, kind):
    guard = f"{name.upper()}_H"
    macro = name.upper()
    arch = " -> ".join(str(s) for s in sizes)
    return f"""\
/* {name}.h -- a cnn_core multilayer perceptron exported as dependency-free C99.
   Layers {arch}, hidden activation {activation}, {kind}.
   Generated by cnn_core.export.export_c; compile {name}.c with any C99 compiler and
   link with -lm.  No allocation and no global state: a call keeps at most
   {macro}_STACK_BYTES bytes of activations on the stack, and calls may run in
   several threads at once. */
#ifndef {guard}
#define {guard}

#ifdef __cplusplus
extern "C" {{
#endif

#define {macro}_N_INPUTS {sizes[0]}
#define {macro}_N_CLASSES {sizes[-1]}
#define {macro}_STACK_BYTES {_stack_bytes(sizes)}

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


def _stack_bytes(sizes):
    """Bytes of activations a predict call keeps on the stack: up to two buffers as
    wide as the widest hidden layer, and the outputs."""
    hidden = sizes[1:-1]
    return 4 * (min(len(hidden), 2) * max(hidden, default=0) + sizes[-1])


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


def _source_text(name, sizes, activation, slope, layers, kind):
    macro = name.upper()
    L = len(sizes) - 1
    quantized = layers[0][2] is not None
    parts = [f"/* {name}.c -- generated by cnn_core.export.export_c: {kind}; "
             f"see {name}.h. */\n"
             "#include <math.h>\n#include <stddef.h>\n#include <stdint.h>\n"
             f'#include "{name}.h"\n']
    for l, (W, b, scale) in enumerate(layers):
        parts.append(f"/* layer {l}: {sizes[l]} -> {sizes[l + 1]} */\n")
        if quantized:
            parts.append(_table("int8_t", f"Q{l}", W.ravel(), str))
            parts.append(_table("float", f"S{l}", scale, _float_literal))
        else:
            parts.append(_table("float", f"W{l}", W.ravel(), _float_literal))
        parts.append(_table("float", f"B{l}", b, _float_literal))
    parts.append(_DENSE_INT8 if quantized else _DENSE_FLOAT)
    body = _activation_c(activation, slope)
    if L > 1 and body is not None:
        parts.append("static void activate(float *y, size_t n)\n{\n"
                     f"    /* y (n,) = {activation}(y) */\n"
                     f"    for (size_t j = 0; j < n; ++j) {{\n{body}\n    }}\n}}\n")
    parts.append(_COMMON)

    lines = ["static int forward(const float *x, float *out)", "{",
             f"    /* out ({macro}_N_CLASSES,) = the network's outputs for x "
             f"({macro}_N_INPUTS,);\n       returns their argmax */"]
    widest = max(sizes[1:-1], default=0)
    buffers = ["a", "b"][:min(L - 1, 2)]
    if buffers:
        lines.append(f"    float {', '.join(f'{v}[{widest}]' for v in buffers)};")
    source = "x"
    for l in range(L):
        target = "out" if l == L - 1 else buffers[l % 2]
        if quantized:
            step = 1 if layers[l][2].shape[0] > 1 else 0     # per-unit or single scale
            call = (f"dense({target}, {source}, Q{l}, S{l}, {step}, B{l}, "
                    f"{sizes[l]}, {sizes[l + 1]});")
        else:
            call = f"dense({target}, {source}, W{l}, B{l}, {sizes[l]}, {sizes[l + 1]});"
        lines.append("    " + call)
        if l < L - 1 and body is not None:
            lines.append(f"    activate({target}, {sizes[l + 1]});")
        source = target
    lines += [f"    return argmax(out, {macro}_N_CLASSES);", "}", ""]
    parts.append("\n".join(lines))
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


# ---- the public function ---------------------------------------------------------------

def _network_parts(network):
    """(sizes, activation, slope, weights, biases) of a Network, checked."""
    try:
        sizes = [int(s) for s in network.layer_sizes]
        activation, slope = network.activation, float(network.leaky_slope)
        weights = [np.asarray(W, dtype=np.float32) for W in network.weights]
        biases = [np.asarray(b, dtype=np.float32) for b in network.biases]
    except AttributeError:
        raise TypeError(f"network must be a cnn_core.Network, got "
                        f"{type(network).__name__}") from None
    if activation not in kernels.HIDDEN_ACTIVATIONS:
        raise ValueError(f"cannot export hidden activation {activation!r}")
    for W, b in zip(weights, biases):
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise ValueError("cannot export a network with NaN or infinite weights")
    return sizes, activation, slope, weights, biases


def export_c(network, folder, *, name="cnn_model", quantize=None, per_channel=True,
             X_check=None):
    """Write ``<name>.h`` and ``<name>.c``: the network as dependency-free C99 code.

    network : a trained :class:`cnn_core.Network`.
    folder : where to write (created if missing); each file is written atomically.
    name : a C identifier prefixing every exported symbol (``<name>_predict``,
        ``<name>_predict_proba``, ``<NAME>_N_INPUTS``, ``<NAME>_N_CLASSES``).
    quantize : None for float32 weights, or "int8" for int8 weights with float scales.
    per_channel : with int8, one scale per output unit (default) or one per matrix.
    X_check : optional (n, n_features) rows (float, or uint8 pixels scaled by 1/255 as
        the Network does) on which to measure ``report.agreement``: the share of rows
        the exported model classifies as ``network.predict`` does.

    Returns an :class:`ExportReport`.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or name in _C_KEYWORDS:
        raise ValueError(f"name must be a C identifier like 'cnn_model', got {name!r}")
    sizes, activation, slope, weights, biases = _network_parts(network)

    layers, max_error, table_bytes = [], 0.0, 0
    for W, b in zip(weights, biases):
        if quantize == "int8":
            q, scale = _quantize(W, per_channel)
            error = np.abs(W - q.astype(np.float32) * scale).max(initial=0.0)
            max_error = max(max_error, float(error))
            layers.append((q, b, scale))
            table_bytes += q.size + 4 * (scale.size + b.size)
        else:
            layers.append((W, b, None))
            table_bytes += 4 * (W.size + b.size)

    n_checked, agreement = 0, None
    if X_check is not None:
        X_check = network._check_X(X_check, "X_check")    # errors name X_check, not X
        expected = np.asarray(network.predict(X_check))
        X = np.asarray(X_check)
        X = X.astype(np.float32) / np.float32(255) if X.dtype == np.uint8 \
            else np.ascontiguousarray(X, dtype=np.float32)
        got = _emulate(layers, activation, slope, X).argmax(axis=1)
        n_checked, agreement = len(X), float((got == expected).mean())

    kind = "float32 weights" if quantize is None else (
        f"int8 weights, one float scale per {'output unit' if per_channel else 'matrix'}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header, source = folder / f"{name}.h", folder / f"{name}.c"
    model_file.write_atomic(source, _source_text(name, sizes, activation, slope, layers,
                                                 kind).encode())
    model_file.write_atomic(header, _header_text(name, sizes, activation, kind).encode())
    return ExportReport(name=name, header=header, source=source, quantize=quantize,
                        per_channel=bool(per_channel) if quantize else False,
                        n_parameters=int(sum(W.size + b.size for W, b in zip(weights, biases))),
                        table_bytes=table_bytes, stack_bytes=_stack_bytes(sizes),
                        max_weight_error=max_error, n_checked=n_checked, agreement=agreement)
