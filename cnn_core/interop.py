"""Moving networks in and out of cnn_core: ONNX export and import, and networks trained
with scikit-learn (``MLPClassifier``) or PyTorch (``nn.Sequential``).

Every converter goes through one small description of a network, a list of *steps*
(:class:`Dense`, :class:`Activation`) in the order they apply to one input row.  Readers
(:func:`from_sklearn`, :func:`from_torch`, :func:`from_onnx`) produce steps from a foreign
model and :func:`network_from_steps` builds the :class:`~cnn_core.Network`; the writer
(:func:`to_onnx`) turns a Network's steps into an ONNX graph.  The last dense layer of a
Network is always followed by softmax, so a foreign model must end in its logits, or in
a softmax (or log-softmax) over the classes, which the Network's own softmax replaces.

The optional packages (``onnx``, ``scikit-learn``, ``torch``) are imported only by the
function that needs them.  Nothing here unpickles anything.

ONNX graphs written by :func:`to_onnx` use opset :data:`OPSET` (IR version
:data:`IR_VERSION`): input ``input``, float32 ``(batch, n_features)`` with a dynamic batch
dimension, holding what :meth:`Network.predict` takes as float input (uint8 pixels
divided by 255); outputs ``label`` (int64, or the classes' own type, ``(batch,)``) and
``probabilities`` (float32 ``(batch, n_classes)``), as scikit-learn classifiers exported
by skl2onnx without ZipMap.  Dense layers are ``Gemm`` nodes with the weights stored
``(n_in, n_out)``, the label is ``ArgMax`` of the logits (the first maximum, as
:meth:`Network.predict`), mapped through the classes by ``Gather`` when they are not
``0 .. n_classes-1``.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import model_file

__all__ = ["ConversionError", "Dense", "Activation", "OPSET", "IR_VERSION", "INPUT",
           "LABEL", "PROBABILITIES", "to_onnx", "onnx_model", "from_onnx", "from_sklearn",
           "from_torch", "network_from_steps", "network_steps"]

OPSET = 17
IR_VERSION = 8
INPUT, LABEL, PROBABILITIES = "input", "label", "probabilities"


class ConversionError(ValueError):
    """A model cannot be converted: a layer, node or setting cnn_core has no counterpart for."""


@dataclass(frozen=True)
class Dense:
    """y = x W + b ; W float32 (n_in, n_out), b float32 (n_out,)."""
    W: np.ndarray
    b: np.ndarray


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: a name of model_file.HIDDEN_ACTIVATIONS and the
    leaky_relu slope (ignored by the others)."""
    name: str
    slope: float = 0.01


def _dense(W, b, where):
    """A Dense step from any array-likes, float32, with matching finite shapes."""
    W = np.array(W, dtype=np.float32, order="C")
    b = np.zeros(W.shape[1:2], np.float32) if b is None else np.array(b, dtype=np.float32)
    if W.ndim != 2 or b.shape != (W.shape[1],):
        raise ConversionError(f"{where}: expected weights (n_in, n_out) and biases (n_out,), "
                              f"got {W.shape} and {b.shape}")
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise ConversionError(f"{where}: weights or biases are not all finite")
    return Dense(W, b)


def _require(module, extra):
    """Import an optional dependency, or an ImportError saying how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this conversion needs {module}: pip install 'cnn_core[{extra}]' "
                          f"({exc})") from exc


# ---- steps <-> Network ---------------------------------------------------------------

def network_steps(net):
    """The steps of a Network: Dense for every layer, its activation between them."""
    steps = []
    for i, (W, b) in enumerate(zip(net.weights, net.biases)):
        steps.append(Dense(np.array(W), np.array(b)))
        if i < len(net.weights) - 1 and net.activation != "identity":
            steps.append(Activation(net.activation, net.leaky_slope))
    return steps


def network_from_steps(steps, source):
    """A Network computing `steps` (then softmax); ConversionError naming `source` if the
    steps are not dense layers with one activation kind between each pair."""
    from .network import Network

    denses, between, gap = [], [], []
    for step in steps:
        if isinstance(step, Dense):
            if denses:
                between.append(gap)
            denses.append(step)
            gap = []
        elif step.name != "identity":
            gap.append(step)
    if not denses:
        raise ConversionError(f"{source} has no dense (linear) layer")
    if gap:
        raise ConversionError(f"{source} applies {gap[0].name} after its last linear layer; "
                              f"a cnn_core Network ends in the logits, followed by softmax")
    for i, g in enumerate(between):
        if len(g) > 1:
            raise ConversionError(f"{source} applies {len(g)} activations "
                                  f"({', '.join(a.name for a in g)}) after linear layer {i}; "
                                  f"cnn_core applies one")
    kinds = [g[0] if g else Activation("identity") for g in between]
    if len(set(kinds)) > 1:
        listed = ", ".join(f"{a.name} after linear layer {i}" for i, a in enumerate(kinds))
        raise ConversionError(f"{source} mixes hidden activations ({listed}); a cnn_core "
                              f"Network applies the same one after every hidden layer")
    hidden = kinds[0] if kinds else Activation("identity")
    sizes = [denses[0].W.shape[0]] + [d.W.shape[1] for d in denses]
    for i, (a, b) in enumerate(zip(denses[:-1], denses[1:])):
        if a.W.shape[1] != b.W.shape[0]:
            raise ConversionError(f"{source}: linear layer {i} has {a.W.shape[1]} outputs "
                                  f"but linear layer {i + 1} takes {b.W.shape[0]} inputs")
    slope = hidden.slope if hidden.name == "leaky_relu" else 0.01
    try:
        net = Network(sizes, hidden.name, leaky_slope=slope, seed=0)
    except ValueError as exc:
        raise ConversionError(f"{source}: {exc}") from None
    net._set_params(np.concatenate([p for d in denses for p in (d.W.ravel(), d.b)]))
    net.seed = None
    return net


# ---- ONNX ----------------------------------------------------------------------------

_ONNX_ACTIVATIONS = {"relu": "Relu", "leaky_relu": "LeakyRelu", "sigmoid": "Sigmoid",
                     "tanh": "Tanh"}


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

    classes : optional labels (n_classes,) ints or strings for the ``label`` output;
        default ``net.classes_`` when set (by :func:`from_sklearn`), else 0..n_classes-1.
    """
    onnx = _require("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    steps = network_steps(net)
    if classes is None:
        classes = getattr(net, "classes_", None)
    classes = None if classes is None else _classes_array(classes, net.n_classes)
    nodes, initializers = [], []
    current = INPUT
    for i, step in enumerate(steps):
        out = f"step{i}"
        if isinstance(step, Dense):
            initializers += [numpy_helper.from_array(step.W, f"W{i}"),
                             numpy_helper.from_array(step.b, f"b{i}")]
            nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [out],
                                          name=f"dense{i}"))
        elif step.name == "leaky_relu":
            nodes.append(helper.make_node("LeakyRelu", [current], [out], name=f"act{i}",
                                          alpha=float(step.slope)))
        else:
            nodes.append(helper.make_node(_ONNX_ACTIVATIONS[step.name], [current], [out],
                                          name=f"act{i}"))
        current = out
    nodes.append(helper.make_node("Softmax", [current], [PROBABILITIES], name="softmax",
                                  axis=1))
    index = LABEL if classes is None or np.array_equal(classes, np.arange(net.n_classes)) \
        else "index"
    nodes.append(helper.make_node("ArgMax", [current], [index], name="argmax", axis=1,
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
    graph = helper.make_graph(
        nodes, "cnn_core_network",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", net.n_features])],
        [helper.make_tensor_value_info(LABEL, label_type, ["batch"]),
         helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT,
                                       ["batch", net.n_classes])],
        initializers)
    model = helper.make_model(graph, producer_name="cnn_core", ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.doc_string = f"cnn_core Network {'-'.join(map(str, net.layer_sizes))} {net.activation}"
    onnx.checker.check_model(model, full_check=True)
    return model


def to_onnx(net, path, classes=None):
    """Write `net` as an ONNX file at `path`, atomically; returns the path.

    See :func:`onnx_model` for `classes` and the module docstring for the graph.
    """
    data = onnx_model(net, classes).SerializeToString()
    model_file.write_atomic(path, data)
    return Path(path)


def _onnx_initializers(graph):
    from onnx import numpy_helper
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _onnx_attributes(node):
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def from_onnx(path):
    """A Network read from an ONNX file holding a chain of dense layers.

    Understood: ``Gemm`` (any alpha, beta, transB; transA 0), ``MatMul`` with an optional
    ``Add`` of a constant bias, ``Relu``, ``LeakyRelu``, ``Sigmoid``, ``Tanh``,
    ``Identity``, ``Dropout`` (inference: nothing), ``Flatten`` of the input, and a final
    ``Softmax``/``LogSoftmax`` over the classes; what follows the logits or the softmax
    (``ArgMax``, label lookups, ``ZipMap``) is left out.  The weights must be constant
    initializers.  Anything else raises ConversionError naming the node.  Files written
    by :func:`to_onnx` read back to the same network, and their classes come back as
    ``classes_``.  Reading an ONNX file runs no code from it.
    """
    onnx = _require("onnx", "onnx")
    try:
        model = onnx.load(str(path))
    except OSError:
        raise
    except Exception as exc:   # protobuf's DecodeError and kin
        raise ConversionError(f"{path} is not an ONNX file: {exc}") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"{path} is not a valid ONNX model: {exc}") from None
    graph = model.graph
    constants = _onnx_initializers(graph)
    inputs = [v for v in graph.input if v.name not in constants]
    if len(inputs) != 1:
        raise ConversionError(f"{path}: expected one graph input, got "
                              f"{[v.name for v in inputs]}")
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    steps, current, classes = [], inputs[0].name, None
    while True:
        followers = [n for n in consumers.get(current, ())
                     if n.op_type not in ("ArgMax", "Shape")]
        argmaxes = [n for n in consumers.get(current, ()) if n.op_type == "ArgMax"]
        if argmaxes and classes is None:
            classes = _onnx_classes(argmaxes[0], consumers, constants)
        if not followers:
            break
        if len(followers) > 1:
            raise ConversionError(f"{path}: tensor {current!r} feeds several nodes "
                                  f"({', '.join(n.op_type for n in followers)}); only a chain "
                                  f"of layers can be read")
        node = followers[0]
        where = f"{path}: node {node.name or node.op_type!r} ({node.op_type})"
        attrs = _onnx_attributes(node)
        if node.op_type in ("Softmax", "LogSoftmax"):
            if attrs.get("axis", 1) not in (1, -1):
                raise ConversionError(f"{where}: softmax over axis {attrs['axis']}, "
                                      f"not the classes")
            break
        if node.op_type in ("Gemm", "MatMul"):
            weight = node.input[1]
            if weight not in constants:
                raise ConversionError(f"{where}: weights {weight!r} are not a constant")
            if attrs.get("transA", 0):
                raise ConversionError(f"{where}: transA=1 is not a dense layer of the input")
            W = constants[weight].T if attrs.get("transB", 0) else constants[weight]
            W = W * attrs.get("alpha", 1.0)
            b, out = None, node.output[0]
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                if node.input[2] not in constants:
                    raise ConversionError(f"{where}: bias {node.input[2]!r} is not a constant")
                b = np.broadcast_to(constants[node.input[2]] * attrs.get("beta", 1.0),
                                    W.shape[1:2])
            elif node.op_type == "MatMul":
                adds = consumers.get(out, ())
                if len(adds) == 1 and adds[0].op_type == "Add":
                    other = [n for n in adds[0].input if n != out]
                    if len(other) == 1 and other[0] in constants:
                        b = np.broadcast_to(constants[other[0]].reshape(-1), W.shape[1:2])
                        out = adds[0].output[0]
            steps.append(_dense(W, b, where))
            current = out
            continue
        if node.op_type in ("Relu", "Sigmoid", "Tanh"):
            steps.append(Activation(node.op_type.lower()))
        elif node.op_type == "LeakyRelu":
            steps.append(Activation("leaky_relu", float(attrs.get("alpha", 0.01))))
        elif node.op_type in ("Flatten", "Reshape") and not steps:
            pass  # flattening the input rows: the Network takes them flat
        elif node.op_type not in ("Identity", "Dropout"):
            raise ConversionError(f"{where}: cnn_core has no counterpart for {node.op_type}")
        current = node.output[0]
    net = network_from_steps(steps, str(path))
    if classes is not None:
        net.classes_ = _classes_array(classes, net.n_classes)
    return net


def _onnx_classes(argmax, consumers, constants):
    """The classes behind an ArgMax's label lookup (Gather of a constant), or None."""
    for node in consumers.get(argmax.output[0], ()):
        if node.op_type == "Gather" and node.input[0] in constants and node.input[1] == \
                argmax.output[0]:
            table = constants[node.input[0]]
            return table.astype(str) if table.dtype.kind in "OSU" else table
    return None


# ---- scikit-learn --------------------------------------------------------------------

_SKLEARN_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh",
                        "relu": "relu"}


def from_sklearn(mlp):
    """A Network equal to a fitted scikit-learn ``MLPClassifier``.

    The Network predicts class indices ``0 .. n_classes-1``; the estimator's labels are
    kept as ``net.classes_`` (``net.classes_[net.predict(X)]`` is ``mlp.predict(X)``, and
    :func:`to_onnx` writes them into the ``label`` output).  A binary classifier (one
    logistic output z) becomes the equivalent two-class softmax over logits (0, z).
    Weights are converted to float32.  A multilabel classifier, a regressor or an
    unfitted estimator raises an error saying so.
    """
    _require("sklearn", "sklearn")
    from sklearn.neural_network import MLPClassifier
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(mlp, MLPClassifier):
        raise TypeError(f"from_sklearn takes a fitted sklearn.neural_network.MLPClassifier, "
                        f"got {type(mlp).__module__}.{type(mlp).__name__}")
    check_is_fitted(mlp, ("coefs_", "intercepts_", "classes_"),
                    msg="this MLPClassifier is not fitted yet: call fit before from_sklearn")
    source = f"MLPClassifier(activation={mlp.activation!r})"
    if mlp.activation not in _SKLEARN_ACTIVATIONS:
        raise ConversionError(f"{source}: cnn_core has no {mlp.activation!r} activation")
    classes = np.asarray(mlp.classes_)
    if classes.ndim != 1 or mlp.out_activation_ not in ("softmax", "logistic") or (
            mlp.out_activation_ == "logistic" and mlp.n_outputs_ != 1):
        raise ConversionError(f"{source} is a multilabel classifier (out_activation_ "
                              f"{mlp.out_activation_!r}, {mlp.n_outputs_} outputs); cnn_core "
                              f"predicts one class per row")
    steps = []
    hidden = Activation(_SKLEARN_ACTIVATIONS[mlp.activation])
    for i, (W, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
        if i:
            steps.append(hidden)
        steps.append(_dense(W, b, f"{source} layer {i}"))
    if mlp.out_activation_ == "logistic":
        # sigmoid(z) = softmax([0, z])[1]: prepend a zero logit for the first class
        last = steps[-1]
        steps[-1] = Dense(np.hstack([np.zeros_like(last.W), last.W]),
                          np.concatenate([np.zeros(1, np.float32), last.b]))
    net = network_from_steps(steps, source)
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


def from_torch(module, input_shape):
    """A Network equal to a PyTorch ``nn.Sequential`` of Linear layers and activations.

    input_shape : one sample as the module sees it, without the batch dimension, e.g.
        ``(784,)`` or ``(1, 28, 28)`` (channels first) for a module opening with Flatten.
    Understood: ``Linear``, ``ReLU``, ``LeakyReLU``, ``Sigmoid``, ``Tanh``, ``Identity``,
    ``Flatten`` (of the whole sample), ``Dropout`` (nothing at inference), nested
    ``Sequential``, and a final ``Softmax``/``LogSoftmax`` over the classes.  The Network
    takes images channels-last, as the rest of cnn_core: rows of ``(height, width,
    channels)`` flattened, which for one channel is the same as torch's flattening.  Any
    other module raises ConversionError naming it.
    """
    torch = _require("torch", "torch")
    nn = torch.nn
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"from_torch takes a torch.nn.Sequential, got "
                        f"{type(module).__module__}.{type(module).__name__}")
    shape = _check_shape(input_shape)
    children = list(_torch_children(module))
    steps, flattened = [], None   # flattened: the (C, H, W) a Flatten turned into rows
    for i, child in enumerate(children):
        where = f"module {i} ({child!r})"
        last = i == len(children) - 1
        if isinstance(child, nn.Linear):
            if len(shape) != 1:
                raise ConversionError(f"{where} gets samples of shape {shape}; put a Flatten "
                                      f"before it")
            if shape[0] != child.in_features:
                raise ConversionError(f"{where} takes {child.in_features} features, but gets "
                                      f"{shape[0]}")
            W = child.weight.detach().cpu().numpy().T
            bias = None if child.bias is None else child.bias.detach().cpu().numpy()
            if flattened is not None:
                # torch flattens (C, H, W), cnn_core (H, W, C): reorder the weights' rows
                channels, height, width = flattened
                W = W.reshape(channels, height, width, -1).transpose(1, 2, 0, 3).reshape(
                    shape[0], -1)
                flattened = None
            steps.append(_dense(W, bias, where))
            shape = (child.out_features,)
        elif isinstance(child, nn.Flatten):
            if child.start_dim not in (1, -len(shape) - 1) or child.end_dim != -1:
                raise ConversionError(f"{where}: only a Flatten of the whole sample "
                                      f"(start_dim=1, end_dim=-1) is supported")
            if len(shape) == 3:
                flattened = shape
            shape = (int(np.prod(shape)),)
        elif isinstance(child, (nn.Softmax, nn.LogSoftmax)) and last:
            if child.dim not in (1, -1):
                raise ConversionError(f"{where}: softmax over dim {child.dim}, not the "
                                      f"classes")
        elif isinstance(child, nn.ReLU):
            steps.append(Activation("relu"))
        elif isinstance(child, nn.LeakyReLU):
            steps.append(Activation("leaky_relu", float(child.negative_slope)))
        elif isinstance(child, nn.Sigmoid):
            steps.append(Activation("sigmoid"))
        elif isinstance(child, nn.Tanh):
            steps.append(Activation("tanh"))
        elif not isinstance(child, (nn.Identity, nn.Dropout)):
            raise ConversionError(f"{where}: cnn_core has no counterpart for "
                                  f"{type(child).__name__}")
    return network_from_steps(steps, f"{type(module).__name__} of {len(children)} modules")
