"""Moving networks in and out of cnn_core: ONNX export and import, and networks trained
with scikit-learn (``MLPClassifier``, ``MLPRegressor``) or PyTorch (``nn.Sequential``).

Every reader (:func:`from_onnx`, :func:`from_sklearn`, :func:`from_torch`) turns a foreign
model into one small description, a list of *steps* in the order they apply to one
sample: :class:`Step` (a cnn_core layer, with its weights in cnn_core's layout) and
:class:`Activation`.  One function, :func:`network_from_steps`, builds the
:class:`~cnn_core.Network` from them and says what cnn_core cannot express: it moves each
activation into the Dense or Conv2D layer it follows (through Flatten, and through max
pooling, which commutes with every activation here since they never decrease), decides
each convolution's padding from the input it gets, and reorders the rows of a Dense layer
that follows a channels-first flatten.  The writer (:func:`to_onnx`) starts from the
Network's own layers.

The optional packages (``onnx``, ``scikit-learn``, ``torch``) are imported only by the
function that needs them.  Nothing here unpickles anything.

ONNX graphs written by :func:`to_onnx` use opset :data:`OPSET` (IR version
:data:`IR_VERSION`): input ``input``, float32 ``(batch, n_features)`` with a dynamic batch
dimension, holding what :meth:`Network.predict` takes as float input (uint8 pixels
divided by 255, images as channels-last rows).  A classifier has the outputs ``label``
(int64, or the classes' own type, ``(batch,)``) and ``probabilities`` (float32 ``(batch,
n_classes)``), as scikit-learn classifiers exported by skl2onnx without ZipMap; a
regression network (``loss="squared_error"``) has the one output ``variable`` (float32
``(batch, n_outputs)``), as skl2onnx regressors.  Dense layers are ``Gemm`` nodes with the
weights stored ``(n_in, n_out)``.  Images are reshaped from the rows to NHWC and
transposed to NCHW for ``Conv`` (weights ``(filters, channels, kernel_h, kernel_w)``,
"same" padding as explicit ``pads``), ``MaxPool`` and ``AveragePool``, then transposed
back to NHWC before ``Flatten``, so the next Dense layer's weights are the stored ones.
Each layer's activation follows it; Dropout does nothing at inference and is left out.
The label is ``ArgMax`` of the logits (the first maximum, as :meth:`Network.predict`),
mapped through the classes by ``Gather`` when they are not ``0 .. n_classes-1``.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layers, model_file

__all__ = ["ConversionError", "Step", "Activation", "OPSET", "IR_VERSION", "INPUT",
           "LABEL", "PROBABILITIES", "VARIABLE", "to_onnx", "onnx_model", "from_onnx",
           "from_sklearn", "from_torch", "network_from_steps"]

OPSET = 17
IR_VERSION = 8
INPUT, LABEL, PROBABILITIES, VARIABLE = "input", "label", "probabilities", "variable"


class ConversionError(ValueError):
    """A model cannot be converted: a layer, node or setting cnn_core has no counterpart for."""


@dataclass(frozen=True, eq=False)
class Step:
    """One layer of a foreign model, as a cnn_core layer.

    layer : Dense or Conv2D (without activation: a following :class:`Activation` sets
        it), MaxPool2D, AvgPool2D or Flatten.
    W, b : a Dense or Conv2D layer's weights and biases in cnn_core's layout, (n_in,
        n_out) and (kernel_h, kernel_w, in_channels, filters); b None for no bias.
    pads : a Conv2D layer's zero padding (top, bottom, left, right), matched against
        "valid" and "same" once the input shape is known.
    channels_first : a Flatten of (channels, height, width) images (PyTorch's and ONNX's
        order); the next Dense layer's rows are reordered to cnn_core's (height, width,
        channels).
    where : the foreign module or node, for error messages.
    """
    layer: layers.Layer
    W: np.ndarray = None
    b: np.ndarray = None
    pads: tuple = None
    channels_first: bool = False
    where: str = ""


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: a name of kernels.HIDDEN_ACTIVATIONS and the leaky_relu
    slope (ignored by the others); where names the foreign module or node."""
    name: str
    slope: float = 0.01
    where: str = ""


def _require(module, extra):
    """Import an optional dependency, or an ImportError saying how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this conversion needs {module}: pip install 'cnn_core[{extra}]' "
                          f"({exc})") from exc


def _layer(where, kind, *args, **kwargs):
    """The cnn_core layer kind(*args, **kwargs), or a ConversionError naming `where`."""
    try:
        return kind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{where}: {exc}") from None


def _float32(array, where, what):
    array = np.array(array, dtype=np.float32, order="C")
    if not np.isfinite(array).all():
        raise ConversionError(f"{where}: {what} are not all finite")
    return array


# ---- steps -> Network ----------------------------------------------------------------

def _with(layer, **changes):
    """A copy of `layer` with some hyper-parameters changed."""
    return type(layer)(**{**layer.config(), **changes})


def _image_input(shape):
    """cnn_core's (height, width, channels) of a foreign sample shape (channels, height,
    width) or (height, width); flat shapes unchanged."""
    if len(shape) == 3:
        return (shape[1], shape[2], shape[0])
    if len(shape) == 2:
        return (shape[0], shape[1], 1)
    return tuple(shape)


def _parameters(step, shape, permute):
    """The checked float32 (W, b) of a Dense or Conv2D step for input `shape`; `permute`
    is the (height, width, channels) a channels-first Flatten left for a Dense layer."""
    W = _float32(step.W, step.where, "weights")
    layer = step.layer
    expected_W, expected_b = layer.parameter_shapes(shape)
    b = np.zeros(expected_b, np.float32) if step.b is None else \
        _float32(step.b, step.where, "biases").reshape(-1)
    if isinstance(layer, layers.Dense) and W.shape != expected_W:
        raise ConversionError(f"{step.where} takes {W.shape[0] if W.ndim == 2 else W.shape} "
                              f"features, but gets {shape[0]}")
    if isinstance(layer, layers.Conv2D) and W.shape != expected_W:
        raise ConversionError(f"{step.where} takes {W.shape[2]} channels with a "
                              f"{W.shape[0]}x{W.shape[1]} kernel, but gets images of "
                              f"{'x'.join(map(str, shape))} (height x width x channels)")
    if b.shape != expected_b:
        raise ConversionError(f"{step.where}: {b.size} biases for {expected_b[0]} outputs")
    if permute is not None:
        height, width, channels = permute
        W = np.ascontiguousarray(W.reshape(channels, height, width, -1).transpose(1, 2, 0, 3)
                                 .reshape(W.shape))
    return W, b


def _conv_padding(step, shape):
    """The Conv2D of `step` with the padding ("valid" or "same") its pads give on `shape`."""
    if step.pads is None or not any(step.pads):
        return _with(step.layer, padding="valid")
    same = _with(step.layer, padding="same")
    amounts = same.padding_amounts(shape)
    if tuple(step.pads) != amounts:
        raise ConversionError(
            f"{step.where} pads (top, bottom, left, right) {tuple(step.pads)}; cnn_core pads "
            f"nothing ('valid') or, with 'same', {amounts} on this "
            f"{shape[0]}x{shape[1]} input (TensorFlow's rule: any odd row or column of "
            f"padding at the bottom or right)")
    return same


def _fold(stack, wheres, activation):
    """Set `activation` on the Dense or Conv2D layer it follows in `stack` (through
    Flatten and max pooling); ConversionError when there is none."""
    name = activation.name
    for position in range(len(stack) - 1, -1, -1):
        layer = stack[position]
        if isinstance(layer, (layers.Dense, layers.Conv2D)):
            if layer.activation != "identity":
                raise ConversionError(f"{activation.where} applies {name} after "
                                      f"{layer.activation} (of {wheres[position]}); cnn_core "
                                      f"applies one activation per layer")
            try:
                stack[position] = _with(layer, activation=name,
                                        leaky_slope=activation.slope if name == "leaky_relu"
                                        else layer.leaky_slope)
            except ValueError as exc:
                raise ConversionError(f"{activation.where}: {exc}") from None
            return
        if isinstance(layer, layers.AvgPool2D):
            raise ConversionError(
                f"{activation.where} applies {name} after average pooling "
                f"({wheres[position]}); cnn_core applies activations inside Dense and Conv2D "
                f"layers, and an average of activations is not the activation of the average")
        # Flatten only reshapes; max(f(x)) = f(max(x)) for the non-decreasing activations
    raise ConversionError(f"{activation.where} applies {name} to the input; cnn_core applies "
                          f"activations inside Dense and Conv2D layers only")


def network_from_steps(input_shape, steps, source, loss="cross_entropy"):
    """A Network taking samples of cnn_core shape `input_shape` ((features,) or (height,
    width, channels)) and computing `steps`, then softmax (loss "cross_entropy") or
    nothing ("squared_error"); ConversionError naming `source` or the step otherwise.

    A Flatten before any layer makes the network take flat rows.  Dropout is not a step:
    it does nothing at inference.
    """
    from .network import Network

    shape = tuple(input_shape)
    stack, wheres, params, permute = [], [], [], None
    for step in steps:
        if isinstance(step, Activation):
            if step.name != "identity":
                _fold(stack, wheres, step)
            continue
        layer = step.layer
        if isinstance(layer, layers.Conv2D):
            if len(shape) != 3:
                raise ConversionError(f"{step.where} needs images, but gets samples of "
                                      f"{shape[0]} features")
            layer = _conv_padding(step, shape)
        try:
            output = layer.output_shape(shape)
        except layers.LayerError as exc:
            raise ConversionError(f"{step.where}: {exc}") from None
        if isinstance(layer, layers.Flatten):
            if len(shape) == 1:
                continue
            if step.channels_first and len(shape) == 3 and shape[2] > 1:
                permute = shape
            if not stack:             # flattening the input: the network takes flat rows
                input_shape = shape = output
                continue
        if isinstance(layer, (layers.Dense, layers.Conv2D)):
            params.append(_parameters(step, shape, permute if isinstance(layer, layers.Dense)
                                      else None))
            if isinstance(layer, layers.Dense):
                permute = None
        stack.append(layer)
        wheres.append(step.where)
        shape = output
    if not any(isinstance(layer, layers.Dense) for layer in stack):
        raise ConversionError(f"{source} has no dense (linear) layer")
    try:
        net = Network([layers.Input(input_shape)] + stack, seed=0, loss=loss)
    except ValueError as exc:
        raise ConversionError(f"{source}: {exc}") from None
    net._set_params(np.concatenate([p for W, b in params for p in (W.ravel(), b)]))
    net.seed = None
    return net


# ---- ONNX writer ---------------------------------------------------------------------

_ONNX_ACTIVATIONS = {"relu": "Relu", "leaky_relu": "LeakyRelu", "sigmoid": "Sigmoid",
                     "tanh": "Tanh"}
_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _classes_array(classes, n_classes):
    """The classes as a 1-D numpy array of n_classes labels (ints or strings)."""
    classes = np.asarray(classes)
    if classes.shape != (n_classes,):
        raise ValueError(f"classes must hold one label per class ({n_classes}), "
                         f"got shape {classes.shape}")
    if classes.dtype.kind in "iub":
        return classes.astype(np.int64)
    if classes.dtype.kind in "UO":
        return classes.astype(str)
    raise TypeError(f"classes must be integers or strings, got dtype {classes.dtype}")


def onnx_model(net, classes=None):
    """The ONNX ModelProto of `net` (see the module docstring), checked by onnx.checker.

    classes : optional labels (n_classes,) ints or strings for the ``label`` output of a
        classifier; default ``net.classes_`` when set (by :func:`from_sklearn`), else
        0..n_classes-1.
    """
    onnx = _require("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    regression = net.loss != "cross_entropy"
    if regression and classes is not None:
        raise ValueError(f"classes label a classifier's outputs; this network has "
                         f"loss={net.loss!r}")
    if classes is None and not regression:
        classes = getattr(net, "classes_", None)
    classes = None if classes is None else _classes_array(classes, net.n_classes)
    nodes, initializers = [], []
    current, nchw = INPUT, False          # nchw: current is (batch, C, H, W), else rows

    def node(op, inputs, name, **attributes):
        nonlocal current
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        current = name

    def constant(array, name):
        initializers.append(numpy_helper.from_array(array, name))
        return name

    def to_nchw(position, shape):
        if not nchw:
            rows_shape = constant(np.array([-1, *shape], np.int64), f"image_shape{position}")
            node("Reshape", [current, rows_shape], f"image{position}")
            node("Transpose", [current], f"nchw{position}", perm=_TO_NCHW)
        return True

    parameters = iter(zip(net.weights, net.biases))
    for position, layer in enumerate(net.layers[1:], start=1):
        name = f"{layer.kind}{position}"
        if isinstance(layer, layers.Dense):
            W, b = next(parameters)
            node("Gemm", [current, constant(np.array(W), f"W{position}"),
                          constant(np.array(b), f"b{position}")], name)
        elif isinstance(layer, layers.Conv2D):
            W, b = next(parameters)
            nchw = to_nchw(position, layer.input_shape)
            top, bottom, left, right = layer.padding_amounts(layer.input_shape)
            node("Conv", [current,
                          constant(np.ascontiguousarray(np.transpose(W, (3, 2, 0, 1))),
                                   f"W{position}"),
                          constant(np.array(b), f"b{position}")], name,
                 kernel_shape=list(layer.kernel_size), strides=[layer.stride] * 2,
                 pads=[top, left, bottom, right])
        elif isinstance(layer, (layers.MaxPool2D, layers.AvgPool2D)):
            nchw = to_nchw(position, layer.input_shape)
            node("MaxPool" if isinstance(layer, layers.MaxPool2D) else "AveragePool",
                 [current], name, kernel_shape=[layer.size] * 2, strides=[layer.stride] * 2)
        elif isinstance(layer, layers.Flatten) and nchw:
            node("Transpose", [current], f"nhwc{position}", perm=_TO_NHWC)
            node("Flatten", [current], name, axis=1)
            nchw = False
        activation = getattr(layer, "activation", "identity")
        if activation == "leaky_relu":
            node("LeakyRelu", [current], f"{name}_{activation}", alpha=layer.leaky_slope)
        elif activation != "identity":
            node(_ONNX_ACTIVATIONS[activation], [current], f"{name}_{activation}")
    if regression:
        nodes[-1].output[0] = VARIABLE
        outputs = [helper.make_tensor_value_info(VARIABLE, TensorProto.FLOAT,
                                                 ["batch", net.n_outputs])]
    else:
        outputs = _classifier_outputs(net, classes, current, nodes, initializers)
    graph = helper.make_graph(
        nodes, "cnn_core_network",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", net.n_features])],
        outputs, initializers)
    model = helper.make_model(graph, producer_name="cnn_core", ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.doc_string = (f"cnn_core Network ({net.loss}): "
                        + ", ".join(repr(layer) for layer in net.layers))
    onnx.checker.check_model(model, full_check=True)
    return model


def _classifier_outputs(net, classes, logits, nodes, initializers):
    """Append softmax and the label to `nodes`; the graph outputs of a classifier."""
    from onnx import TensorProto, helper, numpy_helper

    nodes.append(helper.make_node("Softmax", [logits], [PROBABILITIES], name="softmax",
                                  axis=1))
    index = LABEL if classes is None or np.array_equal(classes, np.arange(net.n_classes)) \
        else "index"
    nodes.append(helper.make_node("ArgMax", [logits], [index], name="argmax", axis=1,
                                  keepdims=0))
    label_type = TensorProto.INT64
    if index != LABEL:
        if classes.dtype.kind == "U":
            label_type = TensorProto.STRING
            table = helper.make_tensor("classes", TensorProto.STRING, classes.shape,
                                       [c.encode() for c in classes])
        else:
            table = numpy_helper.from_array(classes, "classes")
        initializers.append(table)
        nodes.append(helper.make_node("Gather", ["classes", index], [LABEL], name="classes",
                                      axis=0))
    return [helper.make_tensor_value_info(LABEL, label_type, ["batch"]),
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT,
                                          ["batch", net.n_classes])]


def to_onnx(net, path, classes=None):
    """Write `net` as an ONNX file at `path`, atomically; returns the path.

    See :func:`onnx_model` for `classes` and the module docstring for the graph.
    """
    data = onnx_model(net, classes).SerializeToString()
    model_file.write_atomic(path, data)
    return Path(os.fsdecode(path))


# ---- ONNX reader ---------------------------------------------------------------------

def _onnx_attributes(node):
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_dims(value_info):
    """The dimensions of a graph input, None where not fixed."""
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in dims]


class _OnnxReader:
    """Walks the chain of nodes from the graph input, tracking what the current tensor
    is: ``rows`` (batch, features), ``nchw`` or ``nhwc`` images of cnn_core shape
    ``shape`` (height, width, channels), or ``reshaped`` input rows (batch, a, b, c) whose
    meaning the next node decides."""

    def __init__(self, path, graph):
        from onnx import numpy_helper
        self.path = path
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        inputs = [v for v in graph.input if v.name not in self.constants]
        if len(inputs) != 1:
            raise ConversionError(f"{path}: expected one graph input, got "
                                  f"{[v.name for v in inputs]}")
        self.consumers = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {v.name for v in graph.output}
        self.current = inputs[0].name
        dims = _static_dims(inputs[0])
        self.steps, self.classes = [], None
        if len(dims) == 2:
            self.state, self.shape = "rows", (dims[1],)
        elif len(dims) == 4 and all(dims[1:]):
            self.state, self.shape = "nchw", _image_input(dims[1:])
        else:
            raise ConversionError(f"{path}: input {self.current!r} has shape "
                                  f"{['?' if d is None else d for d in dims]}; expected "
                                  f"(batch, features) or (batch, channels, height, width) "
                                  f"with fixed channels, height and width")
        self.input_shape = self.shape

    def constant(self, name, where, what):
        if name not in self.constants:
            raise ConversionError(f"{where}: {what} {name!r} is not a constant")
        return self.constants[name]

    def read(self):
        """(input_shape, steps, loss, classes) of the graph."""
        loss = "cross_entropy"
        while True:
            around = self.consumers.get(self.current, ())
            followers = [n for n in around if n.op_type not in ("ArgMax", "Shape")]
            argmaxes = [n for n in around if n.op_type == "ArgMax"]
            if argmaxes and self.classes is None:
                self.classes = self._classes(argmaxes[0])
            if not followers:
                if self.current == VARIABLE and self.current in self.outputs:
                    loss = "squared_error"
                break
            if len(followers) > 1:
                raise ConversionError(f"{self.path}: tensor {self.current!r} feeds several "
                                      f"nodes ({', '.join(n.op_type for n in followers)}); "
                                      f"only a chain of layers can be read")
            node = followers[0]
            where = f"{self.path}: node {node.name or node.op_type!r} ({node.op_type})"
            attrs = _onnx_attributes(node)
            if node.op_type in ("Softmax", "LogSoftmax"):
                if attrs.get("axis", 1) not in (1, -1) or self.state != "rows":
                    raise ConversionError(f"{where}: softmax over axis "
                                          f"{attrs.get('axis', 1)}, not the classes")
                break
            self.current = self._node(node, where, attrs)
        if self.state == "reshaped":
            raise ConversionError(f"{self.path}: the input is reshaped to images that no "
                                  f"layer uses")
        return self.input_shape, self.steps, loss, self.classes

    def _images(self, where):
        """Check that the current tensor is NCHW images (resolving reshaped rows)."""
        if self.state == "reshaped":
            channels, height, width = self.shape
            if channels != 1:
                raise ConversionError(f"{where}: the input rows are read as {channels} "
                                      f"channels of {height}x{width} (channels first); "
                                      f"cnn_core takes rows of images channels-last")
            self.state, self.shape = "nchw", (height, width, 1)
            self.input_shape = self.shape
        if self.state != "nchw":
            raise ConversionError(f"{where} needs (batch, channels, height, width) images, "
                                  f"but gets {self._describe()}")

    def _describe(self):
        return {"rows": "rows of features", "nhwc": "channels-last images",
                "reshaped": "reshaped input rows"}.get(self.state, "images")

    def _node(self, node, where, attrs):
        """Read one node into steps; the name of its output to follow."""
        op = node.op_type
        if op in ("Gemm", "MatMul"):
            return self._dense(node, where, attrs)
        if op == "Conv":
            self._images(where)
            self._conv(node, where, attrs)
        elif op in ("MaxPool", "AveragePool"):
            self._images(where)
            self._pool(node, where, attrs)
        elif op in ("Relu", "Sigmoid", "Tanh"):
            self.steps.append(Activation(op.lower(), where=where))
        elif op == "LeakyRelu":
            # ONNX keeps the slope as float32: take the shortest decimal that gives it
            slope = float(str(np.float32(attrs.get("alpha", 0.01))))
            self.steps.append(Activation("leaky_relu", slope, where=where))
        elif op == "Transpose":
            self._transpose(where, attrs.get("perm"))
        elif op in ("Flatten", "Reshape"):
            self._flatten_or_reshape(node, where, attrs)
        elif op not in ("Identity", "Dropout"):
            raise ConversionError(f"{where}: cnn_core has no counterpart for {op}")
        return node.output[0]

    def _dense(self, node, where, attrs):
        if self.state != "rows":
            raise ConversionError(f"{where} needs rows of features, but gets "
                                  f"{self._describe()}; put a Flatten before it")
        W = self.constant(node.input[1], where, "weights")
        if W.ndim != 2:
            raise ConversionError(f"{where}: weights of shape {W.shape}, not a matrix")
        if attrs.get("transA", 0):
            raise ConversionError(f"{where}: transA=1 is not a dense layer of the input")
        W = (W.T if attrs.get("transB", 0) else W) * attrs.get("alpha", 1.0)
        bias, out = None, node.output[0]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            bias = self.constant(node.input[2], where, "bias") * attrs.get("beta", 1.0)
        elif node.op_type == "MatMul":
            adds = self.consumers.get(out, ())
            if len(adds) == 1 and adds[0].op_type == "Add":
                other = [n for n in adds[0].input if n != out]
                if len(other) == 1 and other[0] in self.constants:
                    bias = self.constants[other[0]].reshape(-1)
                    out = adds[0].output[0]
        try:
            b = None if bias is None else np.broadcast_to(bias, W.shape[1:2])
        except ValueError:
            raise ConversionError(f"{where}: a bias of shape {bias.shape} for "
                                  f"{W.shape[1]} outputs") from None
        if self.shape[0] is None:
            self.shape = self.input_shape = (W.shape[0],)
        self.steps.append(Step(_layer(where, layers.Dense, W.shape[1]), W, b, where=where))
        self.shape = (W.shape[1],)
        return out

    def _conv(self, node, where, attrs):
        W = self.constant(node.input[1], where, "weights")
        if W.ndim != 4:
            raise ConversionError(f"{where}: only 2-D convolutions (4-D weights) are "
                                  f"supported, got weights of shape {W.shape}")
        if attrs.get("group", 1) != 1:
            raise ConversionError(f"{where}: group={attrs['group']}; cnn_core's Conv2D "
                                  f"connects every input channel to every filter")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise ConversionError(f"{where}: dilations {attrs['dilations']} have no "
                                  f"counterpart in cnn_core")
        strides = list(attrs.get("strides", [1, 1]))
        if len(set(strides)) != 1:
            raise ConversionError(f"{where}: strides {strides}; cnn_core's Conv2D takes one "
                                  f"stride for rows and columns")
        kernel = W.shape[2:]
        conv = _layer(where, layers.Conv2D, W.shape[0], kernel, stride=strides[0])
        b = None
        if len(node.input) > 2 and node.input[2]:
            b = self.constant(node.input[2], where, "bias")
        pads = self._pads(where, attrs, conv)
        self.steps.append(Step(conv, np.transpose(W, (2, 3, 1, 0)), b, pads=pads,
                               where=where))
        try:
            self.shape = _with(conv, padding="same" if any(pads) else "valid").output_shape(
                self.shape)
        except layers.LayerError as exc:
            raise ConversionError(f"{where}: {exc}") from None

    def _pads(self, where, attrs, conv):
        """(top, bottom, left, right) of a Conv node's padding on the current shape."""
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            top, bottom, left, right = _with(conv, padding="same").padding_amounts(self.shape)
            return (top, bottom, left, right) if auto == "SAME_UPPER" else \
                (bottom, top, right, left)
        if auto == "VALID":
            return (0, 0, 0, 0)
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(pads) != 4:
            raise ConversionError(f"{where}: pads {pads} are not those of a 2-D convolution")
        return (pads[0], pads[2], pads[1], pads[3])

    def _pool(self, node, where, attrs):
        kernel = list(attrs.get("kernel_shape", []))
        strides = list(attrs.get("strides", [1, 1]))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        problems = []
        if len(kernel) != 2 or kernel[0] != kernel[1]:
            problems.append(f"kernel_shape {kernel} is not square")
        if len(strides) != 2 or strides[0] != strides[1]:
            problems.append(f"strides {strides} differ")
        if any(attrs.get("pads", [])) or auto not in ("NOTSET", "VALID"):
            problems.append("it pads its input")
        if attrs.get("ceil_mode", 0):
            problems.append("ceil_mode=1")
        if any(d != 1 for d in attrs.get("dilations", [])):
            problems.append(f"dilations {attrs['dilations']}")
        if len(node.output) > 1 and node.output[1]:
            problems.append("it outputs indices")
        if problems:
            raise ConversionError(f"{where}: cnn_core pools square windows without padding "
                                  f"or dilation, but {'; '.join(problems)}")
        kind = layers.MaxPool2D if node.op_type == "MaxPool" else layers.AvgPool2D
        pool = _layer(where, kind, kernel[0], strides[0])
        self.steps.append(Step(pool, where=where))
        try:
            self.shape = pool.output_shape(self.shape)
        except layers.LayerError as exc:
            raise ConversionError(f"{where}: {exc}") from None

    def _transpose(self, where, perm):
        perm = list(perm or [])
        if self.state == "reshaped" and perm == _TO_NCHW:
            # the rows were reshaped to (batch, height, width, channels): cnn_core's own rows
            self.state, self.input_shape = "nchw", self.shape
        elif self.state == "nchw" and perm == _TO_NHWC:
            self.state = "nhwc"
        elif self.state == "nhwc" and perm == _TO_NCHW:
            self.state = "nchw"
        else:
            raise ConversionError(f"{where}: transposing {self._describe()} by {perm} has "
                                  f"no counterpart in cnn_core (only NCHW <-> NHWC)")

    def _flatten_or_reshape(self, node, where, attrs):
        if node.op_type == "Reshape":
            target = [int(d) for d in self.constant(node.input[1], where, "shape").ravel()]
            if attrs.get("allowzero", 0) and 0 in target:
                raise ConversionError(f"{where}: allowzero=1 with a zero dimension")
            if len(target) == 4 and self.state == "rows" and not self.steps \
                    and target[0] in (-1, 0) and all(d > 0 for d in target[1:]):
                if self.shape[0] not in (None, math.prod(target[1:])):
                    raise ConversionError(f"{where}: reshapes {self.shape[0]} features to "
                                          f"{target[1:]}")
                self.state, self.shape = "reshaped", tuple(target[1:])
                return
            if len(target) != 2 or target[0] not in (-1, 0) \
                    or target[1] not in (-1, math.prod(self.shape) if all(self.shape)
                                         else target[1]):
                raise ConversionError(f"{where}: reshape to {target} has no counterpart in "
                                      f"cnn_core (only a flatten of each sample)")
        elif attrs.get("axis", 1) != 1:
            raise ConversionError(f"{where}: Flatten with axis={attrs['axis']}; cnn_core "
                                  f"flattens each sample (axis=1)")
        if self.state == "reshaped":          # back to the rows it came from
            self.state, self.shape = "rows", (math.prod(self.shape),)
        elif self.state != "rows":
            self.steps.append(Step(layers.Flatten(), channels_first=self.state == "nchw",
                                   where=where))
            self.state, self.shape = "rows", (math.prod(self.shape),)

    def _classes(self, argmax):
        """The classes behind an ArgMax's label lookup (Gather of a constant), or None."""
        for node in self.consumers.get(argmax.output[0], ()):
            if node.op_type == "Gather" and node.input[0] in self.constants and \
                    node.input[1] == argmax.output[0]:
                table = self.constants[node.input[0]]
                return table.astype(str) if table.dtype.kind in "OSU" else table
        return None


def from_onnx(path):
    """A Network read from an ONNX file holding a chain of layers.

    Understood: ``Gemm`` (any alpha, beta, transB; transA 0), ``MatMul`` with an optional
    ``Add`` of a constant bias, ``Conv`` (2-D, group 1, no dilation, one stride, padding
    none or cnn_core's "same" on its input), ``MaxPool`` and ``AveragePool`` (square
    windows, no padding, dilation or ceil_mode), ``Relu``, ``LeakyRelu``, ``Sigmoid``,
    ``Tanh``, ``Identity``, ``Dropout`` (inference: nothing), ``Flatten`` and ``Reshape``
    of each sample, ``Transpose`` between NCHW and NHWC, and a final
    ``Softmax``/``LogSoftmax`` over the classes; what follows the logits or the softmax
    (``ArgMax``, label lookups, ``ZipMap``) is left out.  The weights must be constant
    initializers.  The input is rows (batch, features), which may be reshaped to images,
    or images (batch, channels, height, width), which the Network takes channels-last.
    A graph ending in an output named ``variable`` (skl2onnx's regressors, and
    :func:`to_onnx` for ``loss="squared_error"``) is read as a regression network, any
    other as a classifier.  Anything else raises ConversionError naming the node.  Files
    written by :func:`to_onnx` read back to the same network but for its Dropout layers,
    and their classes come back as ``classes_``.  Reading an ONNX file runs no code from
    it.
    """
    onnx = _require("onnx", "onnx")
    try:
        model = onnx.load(os.fsdecode(path))
    except OSError:
        raise
    except Exception as exc:   # protobuf's DecodeError and kin
        raise ConversionError(f"{path} is not an ONNX file: {exc}") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"{path} is not a valid ONNX model: {exc}") from None
    input_shape, steps, loss, classes = _OnnxReader(path, model.graph).read()
    net = network_from_steps(input_shape, steps, str(path), loss)
    if classes is not None and loss == "cross_entropy":
        net.classes_ = _classes_array(classes, net.n_classes)
    return net


# ---- scikit-learn --------------------------------------------------------------------

_SKLEARN_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh",
                        "relu": "relu"}


def from_sklearn(mlp):
    """A Network equal to a fitted scikit-learn ``MLPClassifier`` or ``MLPRegressor``.

    A classifier's Network predicts class indices ``0 .. n_classes-1``; the estimator's
    labels are kept as ``net.classes_`` (``net.classes_[net.predict(X)]`` is
    ``mlp.predict(X)``, and :func:`to_onnx` writes them into the ``label`` output).  A
    binary classifier (one logistic output z) becomes the equivalent two-class softmax
    over logits (0, z).  A regressor becomes a ``loss="squared_error"`` Network whose
    ``predict`` gives ``(n, n_outputs)`` (scikit-learn flattens one output to ``(n,)``).
    Weights are converted to float32.  A multilabel classifier or an unfitted estimator
    raises an error saying so.
    """
    _require("sklearn", "sklearn")
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(mlp, (MLPClassifier, MLPRegressor)):
        raise TypeError(f"from_sklearn takes a fitted sklearn.neural_network.MLPClassifier "
                        f"or MLPRegressor, got {type(mlp).__module__}.{type(mlp).__name__}")
    kind = type(mlp).__name__
    check_is_fitted(mlp, ("coefs_", "intercepts_"),
                    msg=f"this {kind} is not fitted yet: call fit before from_sklearn")
    source = f"{kind}(activation={mlp.activation!r})"
    if mlp.activation not in _SKLEARN_ACTIVATIONS:
        raise ConversionError(f"{source}: cnn_core has no {mlp.activation!r} activation")
    regression = isinstance(mlp, MLPRegressor)
    if regression and mlp.out_activation_ != "identity":
        raise ConversionError(f"{source}: output activation {mlp.out_activation_!r}; "
                              f"cnn_core's regression outputs are linear")
    if not regression:
        classes = np.asarray(mlp.classes_)
        if classes.ndim != 1 or mlp.out_activation_ not in ("softmax", "logistic") or (
                mlp.out_activation_ == "logistic" and mlp.n_outputs_ != 1):
            raise ConversionError(f"{source} is a multilabel classifier (out_activation_ "
                                  f"{mlp.out_activation_!r}, {mlp.n_outputs_} outputs); "
                                  f"cnn_core predicts one class per row")
    weights = [_float32(W, f"{source} layer {i}", "weights") for i, W in
               enumerate(mlp.coefs_)]
    biases = [_float32(b, f"{source} layer {i}", "biases") for i, b in
              enumerate(mlp.intercepts_)]
    if not regression and mlp.out_activation_ == "logistic":
        # sigmoid(z) = softmax([0, z])[1]: prepend a zero logit for the first class
        weights[-1] = np.hstack([np.zeros_like(weights[-1]), weights[-1]])
        biases[-1] = np.concatenate([np.zeros(1, np.float32), biases[-1]])
    steps = []
    for i, (W, b) in enumerate(zip(weights, biases)):
        if i:
            steps.append(Activation(_SKLEARN_ACTIVATIONS[mlp.activation],
                                    where=f"{source} after layer {i - 1}"))
        steps.append(Step(layers.Dense(W.shape[1]), W, b, where=f"{source} layer {i}"))
    net = network_from_steps((weights[0].shape[0],), steps, source,
                             "squared_error" if regression else "cross_entropy")
    if not regression:
        net.classes_ = classes.copy()
    return net


# ---- PyTorch -------------------------------------------------------------------------

def _torch_children(module):
    """The leaf modules of an nn.Sequential, nested Sequentials opened, in order."""
    import torch.nn as nn
    for child in module:
        if isinstance(child, nn.Sequential):
            yield from _torch_children(child)
        else:
            yield child


def _check_shape(input_shape):
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of ints like (784,) or (1, 28, 28), "
                        f"got {input_shape!r}") from None
    if not 1 <= len(shape) <= 3 or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1
            for s in shape):
        raise ValueError(f"input_shape must be (features,) or (channels, height, width) "
                         f"of positive ints (one sample, no batch), got {input_shape!r}")
    return tuple(int(s) for s in shape)


def _torch_numpy(tensor):
    return None if tensor is None else tensor.detach().cpu().float().numpy()


def _torch_conv(child, where):
    """The Step of an nn.Conv2d."""
    problems = []
    if child.groups != 1:
        problems.append(f"groups={child.groups} (cnn_core connects every input channel to "
                        f"every filter)")
    if tuple(child.dilation) != (1, 1):
        problems.append(f"dilation={tuple(child.dilation)}")
    if len(set(child.stride)) != 1:
        problems.append(f"stride={tuple(child.stride)} (cnn_core takes one stride for rows "
                        f"and columns)")
    padding = child.padding
    if isinstance(padding, str):
        pads = (0, 0, 0, 0)
        if padding == "same":       # torch puts any odd row or column at the bottom/right
            (kh, kw) = child.kernel_size
            pads = ((kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2)
    else:
        pads = (padding[0], padding[0], padding[1], padding[1])
    if any(pads) and child.padding_mode != "zeros":
        problems.append(f"padding_mode={child.padding_mode!r} (cnn_core pads with zeros)")
    if problems:
        raise ConversionError(f"{where}: {'; '.join(problems)} has no counterpart in cnn_core")
    W = _torch_numpy(child.weight).transpose(2, 3, 1, 0)       # (kh, kw, in, out)
    layer = _layer(where, layers.Conv2D, child.out_channels, tuple(child.kernel_size),
                   stride=child.stride[0])
    return Step(layer, W, _torch_numpy(child.bias), pads=pads, where=where)


def _torch_pool(child, where, nn):
    """The Step of an nn.MaxPool2d or nn.AvgPool2d."""
    def pair(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    size = pair(child.kernel_size)
    stride = size if child.stride in (None, (), []) else pair(child.stride)
    problems = []
    if size[0] != size[1] or stride[0] != stride[1]:
        problems.append(f"kernel_size={size}, stride={stride} (cnn_core pools square windows "
                        f"with one stride)")
    if any(pair(child.padding)):
        problems.append(f"padding={child.padding}")
    if child.ceil_mode:
        problems.append("ceil_mode=True")
    if isinstance(child, nn.MaxPool2d):
        if any(d != 1 for d in pair(child.dilation)):
            problems.append(f"dilation={child.dilation}")
        if child.return_indices:
            problems.append("return_indices=True")
    elif child.divisor_override is not None:
        problems.append(f"divisor_override={child.divisor_override}")
    if problems:
        raise ConversionError(f"{where}: {'; '.join(problems)} has no counterpart in cnn_core")
    kind = layers.MaxPool2D if isinstance(child, nn.MaxPool2d) else layers.AvgPool2D
    return Step(_layer(where, kind, size[0], stride[0]), where=where)


def from_torch(module, input_shape):
    """A Network equal to a PyTorch ``nn.Sequential`` of layers and activations.

    input_shape : one sample as the module sees it, without the batch dimension, e.g.
        ``(784,)`` or ``(1, 28, 28)`` (channels first).
    Understood: ``Linear``; ``Conv2d`` (groups 1, no dilation, one stride, zero padding
    0 ("valid") or the amounts of cnn_core's "same" on its input, e.g. ``padding=2`` for
    a 5x5 kernel with stride 1, or ``padding="same"``); ``MaxPool2d`` and ``AvgPool2d``
    (square windows, no padding, ceil_mode or dilation); ``Flatten`` (of the whole
    sample); ``ReLU``, ``LeakyReLU`` (slope in [0, 1)), ``Sigmoid``, ``Tanh``,
    ``Identity``; ``Dropout`` (nothing at inference, left out); nested ``Sequential``;
    and a final ``Softmax``/``LogSoftmax`` over the classes.  Each activation must follow
    a Linear or Conv2d layer, possibly through Flatten, Dropout or max pooling (which
    commutes with them); it then becomes that layer's activation.  Any other module, or
    an activation with no such layer before it (on the input, after average pooling or
    after another activation), raises ConversionError naming the module.

    The Network takes images channels-last, as the rest of cnn_core: samples of
    ``(height, width, channels)`` or their rows, the same rows as torch's flattened ones
    for one channel; the weights of a Linear layer after a ``Flatten`` of channels-first
    images are reordered to match.  A Flatten before any layer makes the Network take
    flat rows.  The Network is a classifier (softmax over the last layer's outputs).
    """
    torch = _require("torch", "torch")
    nn = torch.nn
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"from_torch takes a torch.nn.Sequential, got "
                        f"{type(module).__module__}.{type(module).__name__}")
    shape = _check_shape(input_shape)
    children = list(_torch_children(module))
    activations = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
    steps = []
    for i, child in enumerate(children):
        where = f"module {i} ({child!r})"
        if isinstance(child, nn.Linear):
            steps.append(Step(_layer(where, layers.Dense, child.out_features),
                              _torch_numpy(child.weight).T, _torch_numpy(child.bias),
                              where=where))
        elif isinstance(child, nn.Conv2d):
            steps.append(_torch_conv(child, where))
        elif type(child) in (nn.MaxPool2d, nn.AvgPool2d):
            steps.append(_torch_pool(child, where, nn))
        elif isinstance(child, nn.Flatten):
            if child.start_dim not in (1, -len(shape) - 1) or child.end_dim != -1:
                raise ConversionError(f"{where}: only a Flatten of the whole sample "
                                      f"(start_dim=1, end_dim=-1) is supported")
            steps.append(Step(layers.Flatten(), channels_first=True, where=where))
        elif isinstance(child, (nn.Softmax, nn.LogSoftmax)) and i == len(children) - 1:
            if child.dim not in (1, -1):
                raise ConversionError(f"{where}: softmax over dim {child.dim}, not the "
                                      f"classes")
        elif type(child) in activations:
            steps.append(Activation(activations[type(child)], where=where))
        elif isinstance(child, nn.LeakyReLU):
            steps.append(Activation("leaky_relu", float(child.negative_slope), where=where))
        elif not isinstance(child, (nn.Identity, nn.Dropout)):
            raise ConversionError(f"{where}: cnn_core has no counterpart for "
                                  f"{type(child).__name__}")
    return network_from_steps(_image_input(shape), steps,
                              f"{type(module).__name__} of {len(children)} modules")
