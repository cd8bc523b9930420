"""The layers a :class:`cnn_core.Network` is made of.

A layer here is a specification: its kind, its hyper-parameters and the rule that turns an
input shape into an output shape.  The parameters live in the Network (one flat float32
vector the C engine trains) and the computation in the C kernels.

Shapes are per sample and channels-last, as in Keras: ``(features,)`` for flat data and
``(height, width, channels)`` for images.  The kernels use the same layout inside (NHWC),
so ``Flatten`` is a reshape and its order is Keras's.

>>> from cnn_core import layers as L
>>> stack = [L.Input((28, 28, 1)), L.Conv2D(6, 5, padding="same", activation="relu"),
...          L.MaxPool2D(2), L.Flatten(), L.Dense(10)]
"""
import inspect
import math
import numbers

from .kernels import HIDDEN_ACTIVATIONS

__all__ = ["Layer", "Input", "Dense", "Conv2D", "MaxPool2D", "AvgPool2D", "Flatten",
           "Dropout", "LayerError", "from_config", "mlp", "lenet5", "output_shapes", "build"]

MAX_DIMENSION = 1 << 24


class LayerError(ValueError):
    """A layer or a stack of layers that cannot be built (names the layer and the shapes)."""


def _int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= MAX_DIMENSION:
        raise ValueError(f"{name} must be in [{minimum}, {MAX_DIMENSION}], got {value}")
    return int(value)


def _pair(value, name):
    """An int or a pair of ints, as (rows, columns)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return (_int(value[0], name), _int(value[1], name))
    value = _int(value, name)
    return (value, value)


def _activation(value):
    if value is None:
        return "identity"
    if value not in HIDDEN_ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(HIDDEN_ACTIVATIONS)} or None, "
                         f"got {value!r}")
    return value


def _slope(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"leaky_slope must be a number in [0, 1), got {value!r}")
    return float(value)


def _short(value):
    """A square pair as one int (the way it is usually written), anything else as is."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def _shape_text(shape):
    return "x".join(str(d) for d in shape)


class Layer:
    """Base class: ``kind`` names the layer, ``config()`` gives its hyper-parameters
    (``type(layer)(**layer.config())`` is an equal layer), ``output_shape(input_shape)``
    validates the input and gives the output, ``parameter_shapes(input_shape)`` the
    shapes of its weights and biases (none for layers without parameters).  The layers
    of a Network are built (see :func:`build`): ``output_shape()``, ``input_shape``,
    ``parameter_shapes()`` and ``n_parameters`` then describe the layer in place."""

    kind = None
    input_shape = None   # set by build()

    def config(self):
        raise NotImplementedError

    def output_shape(self, input_shape=None):
        """The output shape for ``input_shape``, or, without one, for the input the
        layer was built with."""
        return self._output_shape(self._built_input(input_shape))

    def parameter_shapes(self, input_shape=None):
        """[W shape, b shape] for ``input_shape`` (or the built one); [] without
        parameters."""
        return self._parameter_shapes(self._built_input(input_shape))

    @property
    def n_parameters(self):
        """Number of trained values (weights and biases) of the built layer."""
        return sum(math.prod(shape) for shape in self.parameter_shapes())

    def _built_input(self, input_shape):
        if input_shape is not None:
            return tuple(input_shape)
        if self.input_shape is None:
            raise LayerError(f"{self!r} is not built: pass an input shape, or use the "
                             f"layers of a Network")
        return self.input_shape

    def _output_shape(self, input_shape):
        raise NotImplementedError

    def _parameter_shapes(self, input_shape):
        return []

    def _fans(self, input_shape):
        """(inputs, outputs) that each weight connects, for initialisation."""
        W = self.parameter_shapes(input_shape)[0]
        receptive = math.prod(W[:-2])
        return receptive * W[-2], receptive * W[-1]

    def _error(self, message):
        return LayerError(f"{self!r}: {message}")

    def __eq__(self, other):
        return type(other) is type(self) and other.config() == self.config()

    def __hash__(self):
        return hash((self.kind, tuple(sorted(self.config().items()))))

    def __repr__(self):
        """The call that makes this layer, leaving out arguments at their defaults."""
        config = self.config()
        parameters = inspect.signature(type(self)).parameters
        required = [key for key in config if parameters[key].default is inspect.Parameter.empty]
        defaults = type(self)(**{key: config[key] for key in required}).config()
        arguments = [repr(_short(config[key])) for key in required]
        arguments += [f"{key}={_short(value)!r}" for key, value in config.items()
                      if key not in required and value != defaults[key]
                      and not (key == "leaky_slope" and config["activation"] != "leaky_relu")]
        return f"{type(self).__name__}({', '.join(arguments)})"


class Input(Layer):
    """The shape of one sample: ``(features,)``, ``(height, width, channels)``, or
    ``(height, width)`` for one channel."""

    kind = "input"

    def __init__(self, shape):
        if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
            shape = (shape,)
        try:
            shape = tuple(shape)
        except TypeError:
            raise TypeError(f"Input shape must be a tuple of ints, got {shape!r}") from None
        if len(shape) == 2:
            shape = shape + (1,)
        if len(shape) not in (1, 3):
            raise ValueError(f"Input shape must be (features,), (height, width) or "
                             f"(height, width, channels), got {shape!r}")
        self.shape = tuple(_int(d, "every Input dimension") for d in shape)
        if math.prod(self.shape) > MAX_DIMENSION:
            raise ValueError(f"Input shape {self.shape} has more than {MAX_DIMENSION} values")

    def config(self):
        return {"shape": self.shape}

    def output_shape(self, input_shape=None):
        return self.shape


class Dense(Layer):
    """A fully connected layer: ``activation(x @ W + b)``, W of shape (inputs, units)."""

    kind = "dense"

    def __init__(self, units, activation=None, leaky_slope=0.01):
        self.units = _int(units, "units")
        self.activation = _activation(activation)
        self.leaky_slope = _slope(leaky_slope)

    def config(self):
        return {"units": self.units, "activation": self.activation,
                "leaky_slope": self.leaky_slope}

    def _output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise self._error(f"needs a flat input, got an image of {_shape_text(input_shape)}"
                              f"; put Flatten() before it")
        return (self.units,)

    def _parameter_shapes(self, input_shape):
        return [(input_shape[0], self.units), (self.units,)]


class Conv2D(Layer):
    """A 2-D convolution (cross-correlation, as in every framework) over channels-last
    images: W of shape (kernel_h, kernel_w, in_channels, filters), then
    ``activation(. + b)``.  padding "valid" keeps only full windows; "same" pads with
    zeros so that the output has ceil(input / stride) rows and columns (TensorFlow's
    rule: the extra row or column of padding goes at the bottom or right)."""

    kind = "conv2d"

    def __init__(self, filters, kernel_size, stride=1, padding="valid", activation=None,
                 leaky_slope=0.01):
        self.filters = _int(filters, "filters")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _int(stride, "stride")
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding
        self.activation = _activation(activation)
        self.leaky_slope = _slope(leaky_slope)

    def config(self):
        return {"filters": self.filters, "kernel_size": self.kernel_size,
                "stride": self.stride, "padding": self.padding,
                "activation": self.activation, "leaky_slope": self.leaky_slope}

    def padding_amounts(self, input_shape):
        """(top, bottom, left, right) rows and columns of zeros around the input."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        amounts = []
        for size, k in zip(input_shape[:2], self.kernel_size):
            out = -(-size // self.stride)
            total = max((out - 1) * self.stride + k - size, 0)
            amounts += [total // 2, total - total // 2]
        return tuple(amounts)

    def _output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise self._error(f"needs an image input (height, width, channels), got "
                              f"{input_shape}; give Input a 3-D shape such as (28, 28, 1)")
        h, w, _ = input_shape
        kh, kw = self.kernel_size
        if self.padding == "same":
            return (-(-h // self.stride), -(-w // self.stride), self.filters)
        if kh > h or kw > w:
            raise self._error(f"kernel {kh}x{kw} is larger than its input "
                              f"{_shape_text(input_shape)} with padding='valid'")
        return ((h - kh) // self.stride + 1, (w - kw) // self.stride + 1, self.filters)

    def _parameter_shapes(self, input_shape):
        return [self.kernel_size + (input_shape[2], self.filters), (self.filters,)]


class _Pool2D(Layer):
    def __init__(self, size, stride=None):
        self.size = _int(size, "size")
        self.stride = self.size if stride is None else _int(stride, "stride")

    def config(self):
        return {"size": self.size, "stride": self.stride}

    def _output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise self._error(f"needs an image input (height, width, channels), got "
                              f"{input_shape}")
        h, w, c = input_shape
        if self.size > h or self.size > w:
            raise self._error(f"window {self.size}x{self.size} is larger than its input "
                              f"{_shape_text(input_shape)}")
        return ((h - self.size) // self.stride + 1, (w - self.size) // self.stride + 1, c)


class MaxPool2D(_Pool2D):
    """The maximum of each size x size window (valid windows only), per channel; the
    stride defaults to the size.  The gradient goes to the first maximum of a window
    (row-major order) on ties."""

    kind = "maxpool2d"


class AvgPool2D(_Pool2D):
    """The mean of each size x size window (valid windows only), per channel; the stride
    defaults to the size."""

    kind = "avgpool2d"


class Flatten(Layer):
    """An image (height, width, channels) as one flat vector, in that (channels-last)
    order; flat inputs pass unchanged."""

    kind = "flatten"

    def config(self):
        return {}

    def _output_shape(self, input_shape):
        return (math.prod(input_shape),)


class Dropout(Layer):
    """Inverted dropout: during ``fit`` each value is zeroed with probability ``rate`` and
    the others are scaled by 1 / (1 - rate); at inference the layer does nothing.  The
    masks come from the Network's seed, never from the thread count."""

    kind = "dropout"

    def __init__(self, rate):
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) \
                or not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"Dropout rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)

    def config(self):
        return {"rate": self.rate}

    def _output_shape(self, input_shape):
        return tuple(input_shape)


KINDS = {cls.kind: cls for cls in (Input, Dense, Conv2D, MaxPool2D, AvgPool2D, Flatten,
                                   Dropout)}


def from_config(kind, config):
    """The layer of ``kind`` ("dense", "conv2d", ...) with hyper-parameters ``config``."""
    if kind not in KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; known: {list(KINDS)}")
    return KINDS[kind](**config)


def mlp(layer_sizes, activation="relu", leaky_slope=0.01):
    """The layers of the MLP shorthand ``[n_features, hidden..., n_outputs]``: dense
    hidden layers with ``activation`` and a last Dense layer of logits."""
    sizes = list(layer_sizes)
    if len(sizes) < 2:
        raise ValueError(f"layer_sizes needs at least 2 entries (inputs, outputs), got "
                         f"{len(sizes)}")
    return ([Input((sizes[0],))]
            + [Dense(units, activation, leaky_slope) for units in sizes[1:-1]]
            + [Dense(sizes[-1])])


def lenet5(dropout=0.25):
    """A LeNet-5-style network for 28x28 grey images and 10 classes (the README's CNN):
    two 5x5 convolutions with relu, each followed by 2x2 max pooling, then Dense 120 and
    84 with relu, Dropout(dropout) when it is above 0, and 10 logits."""
    return ([Input((28, 28, 1)), Conv2D(6, 5, padding="same", activation="relu"),
             MaxPool2D(2), Conv2D(16, 5, activation="relu"), MaxPool2D(2), Flatten(),
             Dense(120, activation="relu"), Dense(84, activation="relu")]
            + ([Dropout(dropout)] if dropout else []) + [Dense(10)])


def output_shapes(stack):
    """The output shape of every layer of ``stack`` (which starts with Input), checking
    that each layer accepts its input; LayerError names the first layer that does not."""
    stack = list(stack)
    if not stack or not isinstance(stack[0], Input):
        raise LayerError("a layer stack starts with Input(shape)")
    for position, layer in enumerate(stack):
        if not isinstance(layer, Layer):
            raise TypeError(f"layer {position} must be a cnn_core.layers layer, got "
                            f"{type(layer).__name__}")
        if position and isinstance(layer, Input):
            raise LayerError(f"Input can only be the first layer (found at {position})")
    if len(stack) < 2:
        raise LayerError("a layer stack needs at least one layer after Input")
    if not isinstance(stack[-1], Dense):
        raise LayerError(f"the last layer gives the network's outputs and must be Dense, "
                         f"got {stack[-1]!r}")
    shapes, shape = [], stack[0].shape
    for position, layer in enumerate(stack):
        try:
            shape = layer.output_shape(shape)
        except LayerError as error:
            raise LayerError(f"layer {position}, {error}") from None
        if math.prod(shape) > MAX_DIMENSION:
            raise LayerError(f"layer {position}, {layer!r}: output "
                             f"{_shape_text(shape)} has more than {MAX_DIMENSION} values")
        shapes.append(shape)
    return shapes


def build(stack):
    """Copies of the layers of ``stack`` (checked as :func:`output_shapes` does), each
    knowing its ``input_shape``: ``output_shape()`` and ``parameter_shapes()`` then need
    no argument.  The layers given are left as they are."""
    stack = list(stack)
    shapes = output_shapes(stack)
    built = [from_config(layer.kind, layer.config()) for layer in stack]
    for layer, shape in zip(built[1:], shapes):
        layer.input_shape = shape
    built[0].input_shape = shapes[0]
    return built
