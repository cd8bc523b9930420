"""Layer specifications: shapes, validation, configs."""
import pytest

from cnn_core import layers as L


LENET = [L.Input((28, 28, 1)), L.Conv2D(6, 5, padding="same", activation="relu"),
         L.MaxPool2D(2), L.Conv2D(16, 5, activation="relu"), L.MaxPool2D(2), L.Flatten(),
         L.Dense(120, activation="relu"), L.Dense(84, activation="relu"), L.Dropout(0.25),
         L.Dense(10)]


def test_lenet_shapes():
    assert L.output_shapes(LENET) == [(28, 28, 1), (28, 28, 6), (14, 14, 6), (10, 10, 16),
                                      (5, 5, 16), (400,), (120,), (84,), (84,), (10,)]
    assert LENET[1].parameter_shapes((28, 28, 1)) == [(5, 5, 1, 6), (6,)]
    assert LENET[6].parameter_shapes((400,)) == [(400, 120), (120,)]


def test_build_gives_each_copy_its_shapes():
    built = L.build(LENET)
    assert built == LENET and all(a is not b for a, b in zip(built, LENET))
    assert [layer.output_shape() for layer in built] == L.output_shapes(LENET)
    assert built[1].input_shape == (28, 28, 1) and built[6].input_shape == (400,)
    assert [layer.n_parameters for layer in built] == [0, 156, 0, 2416, 0, 0, 48120, 10164,
                                                       0, 850]
    assert built[3].parameter_shapes() == [(5, 5, 6, 16), (16,)]
    with pytest.raises(L.LayerError, match="not built"):
        LENET[1].output_shape()              # the layers given stay unbuilt
    with pytest.raises(L.LayerError, match="layer 3"):
        L.build([L.Input((8, 8, 1)), L.Conv2D(2, 3), L.MaxPool2D(2), L.Conv2D(2, 5),
                 L.Flatten(), L.Dense(2)])


@pytest.mark.parametrize("size, k, stride", [(1, 1, 1), (7, 3, 2), (28, 5, 2), (31, 5, 2),
                                             (5, 1, 2), (2, 5, 1)])
def test_same_padding_follows_tensorflow(size, k, stride):
    conv = L.Conv2D(3, k, stride=stride, padding="same")
    out_h, out_w, _ = conv.output_shape((size, size + 1, 2))
    top, bottom, left, right = conv.padding_amounts((size, size + 1, 2))
    for n, out, before, after in ((size, out_h, top, bottom), (size + 1, out_w, left, right)):
        assert out == -(-n // stride)
        assert (out - 1) * stride + k <= n + before + after < out * stride + k
        assert after - before in (0, 1)


def test_config_round_trip():
    for layer in LENET:
        assert L.from_config(layer.kind, layer.config()) == layer


def test_mlp_shorthand():
    assert L.mlp([784, 128, 10], "tanh") == [L.Input((784,)), L.Dense(128, "tanh"),
                                             L.Dense(10)]


@pytest.mark.parametrize("stack, words", [
    ([L.Input((3, 3, 1)), L.Conv2D(2, 5), L.Flatten(), L.Dense(2)], ["layer 1", "5x5", "3x3x1"]),
    ([L.Input((8, 8, 1)), L.Dense(4)], ["layer 1", "Flatten"]),
    ([L.Input((10,)), L.Conv2D(2, 3), L.Dense(2)], ["layer 1", "image"]),
    ([L.Input((4, 4, 2)), L.MaxPool2D(5), L.Flatten(), L.Dense(2)], ["layer 1", "5x5"]),
    ([L.Input((4,)), L.Dense(3), L.Dropout(0.5)], ["last layer", "Dropout"]),
    ([L.Dense(3)], ["Input"]),
])
def test_bad_stacks_name_the_layer(stack, words):
    with pytest.raises(L.LayerError) as error:
        L.output_shapes(stack)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("make", [lambda: L.Dropout(-0.1), lambda: L.Dropout(1.0),
                                  lambda: L.Conv2D(0, 3), lambda: L.Conv2D(2, 3, padding="full"),
                                  lambda: L.Dense(4, activation="softmax"),
                                  lambda: L.MaxPool2D(2, stride=0), lambda: L.Input((2, 2, 2, 2))])
def test_bad_hyper_parameters(make):
    with pytest.raises(ValueError):
        make()
