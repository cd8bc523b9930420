"""The ``cnn-core`` command line (also ``python -m cnn_core``): train a network on MNIST,
evaluate a saved model, convert between model files and ONNX, show build facts.

``main(argv)`` parses the arguments, runs one subcommand and returns the exit status:
0 on success, 2 for a bad option, path, data or model file (reported as one line
``cnn-core: error: ...`` on stderr, never a traceback), 130 when interrupted.
"""
import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import cnn_core
from . import kernels, layers, model_file, training
from .datasets import DownloadError, load_mnist
from .network import DEFAULT_LEARNING_RATE, Network

__all__ = ["main", "build_parser"]

PROG = "cnn-core"
DEFAULT_OUTPUT = "mnist_mlp.cnn"

OPTIMIZERS = list(DEFAULT_LEARNING_RATE)
CNN_SGD_LEARNING_RATE = 0.02   # --model cnn's default with SGD (0.05 makes it unsteady)

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


class CommandError(Exception):
    """A problem the user can fix; main() prints it as one error line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become CommandError, so every error reads the same."""

    def error(self, message):
        raise CommandError(f"{message} (see '{self.prog} --help')")


# ---- argument types -------------------------------------------------------------------
def _integer(text, minimum, what, maximum=math.inf):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text):
    """An int >= 1."""
    return _integer(text, 1, "a positive integer")


def _thread_count(text):
    """An int in [1, 1024], as n_threads takes."""
    return _integer(text, 1, "a thread count from 1 to 1024", 1024)


def _non_negative_int(text):
    """An int >= 0."""
    return _integer(text, 0, "a non-negative integer")


def _float_parser(low, high=math.inf, low_open=False, high_open=False):
    """A converter to a finite float in the interval described by the arguments."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    interval = f"{left}{low:g}, {high:g}{right}" if high != math.inf else None
    what = (f"a number in {interval}" if interval
            else f"a finite number {'>' if low_open else '>='} {low:g}")

    def convert(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return convert


def _hidden_sizes(text):
    """'256,128' -> [256, 128]; 'none' -> [] (no hidden layer: softmax regression)."""
    if text.strip().lower() == "none":
        return []
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()):
            raise argparse.ArgumentTypeError(
                f"expected positive integers separated by commas (e.g. 256,128) or 'none', "
                f"got {text!r}")
        size = int(part)
        if not 1 <= size <= 1 << 24:
            raise argparse.ArgumentTypeError(
                f"hidden layer sizes must be between 1 and {1 << 24}, got {size}")
        sizes.append(size)
    if len(sizes) > model_file.MAX_LAYERS - 1:
        raise argparse.ArgumentTypeError(
            f"at most {model_file.MAX_LAYERS - 1} hidden layers, got {len(sizes)}")
    return sizes


# ---- the parser -----------------------------------------------------------------------
def _add_data(parser):
    parser.add_argument(
        "--data", metavar="DIR", type=Path,
        help="folder holding the four MNIST files (gzipped or not); default: the "
             "CNN_CORE_DATA environment variable, else a per-user cache folder where "
             "missing files are downloaded and verified")


def _add_threads(parser):
    parser.add_argument(
        "--threads", metavar="N", type=_thread_count,
        help="threads for the kernels (default: OMP_NUM_THREADS, else all cores)")


def build_parser():
    """The argparse parser of the cnn-core command and its subcommands."""
    parser = _Parser(prog=PROG, description="Train and evaluate neural networks "
                     "on MNIST with cnn_core's C kernels.")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {cnn_core.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train a network on MNIST and save it",
        description="Train a network on the MNIST training images, report "
                    "the held-out test set after every epoch (for monitoring only: "
                    "nothing is tuned on it), then save the model.")
    _add_data(train)
    train.add_argument("--model", default="mlp", choices=["mlp", "cnn"],
                       help="mlp: a multilayer perceptron (--hidden, --activation); cnn: "
                            "the convolutional network of cnn_core.layers.lenet5 (two "
                            "Conv2D+MaxPool2D stages, Dense 120 and 84, Dropout 0.25) "
                            "(default: %(default)s)")
    train.add_argument("--hidden", metavar="SIZES", type=_hidden_sizes, default=None,
                       help="comma-separated hidden layer sizes of the mlp, e.g. 256,128; "
                            "'none' for no hidden layer (default: 128)")
    train.add_argument("--activation", default=None,
                       choices=list(kernels.HIDDEN_ACTIVATIONS),
                       help="activation of the mlp's hidden layers (default: relu)")
    train.add_argument("--epochs", metavar="N", type=_positive_int, default=10,
                       help="passes over the training images (default: %(default)s)")
    train.add_argument("--batch-size", metavar="N", type=_positive_int, default=64,
                       help="images per gradient step (default: %(default)s)")
    train.add_argument("--train-samples", metavar="N", type=_positive_int,
                       help="train on at most the first N training images (quick trials); "
                            "default: all")
    train.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                       help="gradient descent variant (default: %(default)s)")
    train.add_argument("--learning-rate", metavar="LR", type=_float_parser(0, low_open=True),
                       help="step size (default: 0.05 for sgd, 0.02 for sgd with --model "
                            "cnn, 0.001 for adam and adamw)")
    train.add_argument("--momentum", metavar="M", type=_float_parser(0, 1, high_open=True),
                       default=0.9, help="momentum of sgd (default: %(default)s)")
    train.add_argument("--nesterov", action="store_true",
                       help="use Nesterov momentum (sgd only)")
    train.add_argument("--weight-decay", metavar="WD", type=_float_parser(0), default=0.0,
                       help="L2 penalty, decoupled weight decay for adamw (default: %(default)s)")
    train.add_argument("--seed", metavar="N", type=_non_negative_int, default=0,
                       help="seed of the initial weights and the shuffling; the same seed "
                            "trains the same model (default: %(default)s)")
    _add_threads(train)
    _add_toolkit(train)
    save = train.add_mutually_exclusive_group()
    save.add_argument("-o", "--output", metavar="PATH", type=Path, default=Path(DEFAULT_OUTPUT),
                      help="model file to write, atomically (default: %(default)s in the "
                           "current folder); its folder must exist, and is checked before "
                           "training")
    save.add_argument("--no-save", action="store_true",
                      help="do not save the model (just report its accuracy)")

    evaluate = commands.add_parser(
        "evaluate", help="report a saved model's loss and accuracy on the MNIST test set",
        description="Load a model saved by 'cnn-core train' (or Network.save), or an ONNX "
                    "file, and print its loss and accuracy on the MNIST test images (for a "
                    "regression network with one output: its squared error and R^2 on the "
                    "digit values).")
    evaluate.add_argument("model", metavar="MODEL", type=Path,
                          help="model file (.cnn), or ONNX (.onnx)")
    _add_data(evaluate)
    _add_threads(evaluate)
    evaluate.add_argument("--plot", metavar="PNG", type=Path,
                          help="also draw the confusion matrix beside the most confidently "
                               "misclassified test images to this picture (.png, .svg, "
                               ".pdf; needs matplotlib)")

    convert = commands.add_parser(
        "convert", help="convert between cnn_core model files (.cnn) and ONNX (.onnx)",
        description="Convert a network (a multilayer perceptron or a convolutional "
                    "network, a classifier or a regression network) between formats, told "
                    "apart by the file names: a cnn_core model file (.cnn), ONNX (.onnx), "
                    "or, with --unsafe-pickle only, a pickled scikit-learn MLPClassifier or "
                    "MLPRegressor (.pkl, .pickle, .joblib) as the source. The target is "
                    "written atomically.")
    convert.add_argument("source", metavar="SOURCE", type=Path, help="file to read")
    convert.add_argument("target", metavar="TARGET", type=Path,
                         help="file to write: .cnn or .onnx")
    convert.add_argument("--unsafe-pickle", action="store_true",
                         help="allow a pickled scikit-learn model as SOURCE; unpickling runs "
                              "any code the file holds, so use it only for files you trust")

    info = commands.add_parser(
        "info", help="show the version, GEMM kernel and threads, or a model's layers",
        description="Show cnn_core's version and build and runtime facts; with a model "
                    "file (or ONNX file), its layers, output shapes and parameter counts.")
    info.add_argument("model", metavar="MODEL", type=Path, nargs="?", default=None,
                      help="model file (.cnn) or ONNX file (.onnx) to describe (optional)")
    return parser


def _add_toolkit(train):
    """Options of the training toolkit (cnn_core.training) and the curves' picture."""
    train.add_argument("--schedule", metavar="NAME", choices=list(training.SCHEDULES),
                       help="learning-rate schedule with default parameters: "
                            + ", ".join(training.SCHEDULES) + " (default: constant)")
    train.add_argument("--validation-split", metavar="F", default=0.0,
                       type=_float_parser(0, 1, low_open=True, high_open=True),
                       help="hold out this fraction of the training images (the last "
                            "ones) to validate on, instead of the test images")
    train.add_argument("--early-stopping", metavar="PATIENCE", type=_positive_int,
                       help="stop when the validation loss has not improved for PATIENCE "
                            "epochs, keeping the best epoch's weights (needs "
                            "--validation-split)")
    train.add_argument("--plot", metavar="PNG", type=Path,
                       help="draw the loss and accuracy curves to this picture (.png, "
                            ".svg, .pdf; needs matplotlib)")


def _check_plot(path):
    """Fail before training if the picture cannot be drawn or written."""
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install 'cnn_core[plot]'") from None
    if not path.parent.is_dir():
        raise CommandError(f"cannot write the picture {path}: {path.parent} is not a folder")
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in formats:
        raise CommandError(f"cannot draw {path}: matplotlib writes "
                           f"{', '.join('.' + f for f in sorted(formats))}, not {path.suffix}")


def _toolkit_fit_options(args, X_test, y_test):
    """fit() arguments of the toolkit options, and a description of them."""
    if args.early_stopping and not args.validation_split:
        raise CommandError("--early-stopping needs --validation-split (the test images are "
                           "for monitoring only)")
    options = {"schedule": args.schedule}
    if args.validation_split:
        options["validation_split"] = args.validation_split
        what = f"the last {args.validation_split:.0%} of the training images"
    else:
        options["validation_data"] = (X_test, y_test)
        what = f"{len(X_test)} test images"
    if args.early_stopping:
        options["early_stopping"] = training.EarlyStopping("val_loss", args.early_stopping)
    return options, what


# ---- commands -------------------------------------------------------------------------
def _check_output(path):
    """Fail now, not after training, if a model file cannot be written at `path`."""
    if path.is_dir():
        raise CommandError(f"output {path} is a folder; give a file name, "
                           f"e.g. {path / DEFAULT_OUTPUT}")
    folder = path.parent
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist"
        raise CommandError(f"cannot save the model to {path}: {folder} {reason}")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise CommandError(f"cannot save the model to {path}: folder {folder} is not "
                           f"writable ({exc.strerror or exc})") from None


def _load_data(folder):
    """((X_train, y_train), (X_test, y_test)) of MNIST, from `folder` or the default."""
    try:
        return load_mnist(folder, download=True, verbose=True)
    except DownloadError as exc:
        raise CommandError(f"{_one_line(exc)} (On the command line: --data DIR.)") from None


def _describe(net):
    """A network in one line: '784-128-10 relu' for an MLP, else its layer kinds."""
    if net.layer_sizes is not None:
        return "-".join(map(str, net.layer_sizes)) + f" {net.activation}"
    return ("-".join(type(layer).__name__ for layer in net.layers[1:])
            + f" ({net._params.shape[0]:,} parameters)")


def _network(args, n_features):
    """The network `cnn-core train` builds from --model, --hidden and --activation."""
    if args.model == "cnn":
        if args.hidden is not None or args.activation is not None:
            raise CommandError("--hidden and --activation describe the mlp; --model cnn "
                               "has fixed layers")
        return Network(layers.lenet5(), seed=args.seed)
    hidden = [128] if args.hidden is None else args.hidden
    return Network([n_features, *hidden, 10], args.activation or "relu", seed=args.seed)


def _result_line(loss, accuracy, n):
    return f"test accuracy {accuracy:.4f} (loss {loss:.4f}) on {n} images"


def _train(args):
    if args.nesterov and (args.optimizer != "sgd" or args.momentum == 0.0):
        raise CommandError("--nesterov needs --optimizer sgd and --momentum > 0")
    if not args.no_save:
        _check_output(args.output)
    _check_plot(args.plot)
    (X, y), (X_test, y_test) = _load_data(args.data)
    if args.train_samples is not None:
        X, y = X[:args.train_samples], y[:args.train_samples]
    net = _network(args, X.shape[1])
    learning_rate = args.learning_rate
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATE[args.optimizer]
        if args.model == "cnn" and args.optimizer == "sgd":
            learning_rate = CNN_SGD_LEARNING_RATE
    settings = [args.optimizer, f"learning rate {learning_rate:g}"]
    if args.optimizer == "sgd":
        settings.append(f"momentum {args.momentum:g}" + (" (nesterov)" if args.nesterov else ""))
    if args.weight_decay:
        settings.append(f"weight decay {args.weight_decay:g}")
    settings.append(f"batch size {args.batch_size}")
    options, validating = _toolkit_fit_options(args, X_test, y_test)
    if args.schedule:
        settings.append(f"{args.schedule} schedule")
    print(f"training {_describe(net)} on {len(X)} images for {args.epochs} epochs "
          f"({', '.join(settings)}); validating on {validating}", flush=True)
    history = net.fit(X, y, epochs=args.epochs, batch_size=args.batch_size,
                      optimizer=args.optimizer, learning_rate=learning_rate,
                      momentum=args.momentum, nesterov=args.nesterov,
                      weight_decay=args.weight_decay, verbose=1, n_threads=args.threads,
                      **options)
    if history.best_epoch is not None:
        print(f"kept the weights of epoch {history.best_epoch} (lowest validation loss)")
    if args.plot is not None:
        history.plot(args.plot)
        print(f"curves drawn to {args.plot}")
    loss, accuracy = net.evaluate(X_test, y_test, n_threads=args.threads)
    if args.no_save:
        where = "model not saved (--no-save)"
    else:
        net.save(args.output)
        where = f"model saved to {args.output}"
    print(f"{_result_line(loss, accuracy, len(X_test))}; {where}")
    return EXIT_OK


def _load_model(path):
    """The Network in `path` (a model file, or ONNX by its suffix), or a CommandError
    saying why not."""
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "does not exist"
        raise CommandError(f"model file {path} {reason}")
    try:
        if path.suffix.lower() == ".onnx":
            return Network.from_onnx(path)
        return Network.load(path)
    except OSError as exc:
        raise CommandError(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _evaluate(args):
    path = args.model
    net = _load_model(path)
    (_, _), (X_test, y_test) = _load_data(args.data)
    if net.n_features != X_test.shape[1]:
        raise CommandError(f"model {path} takes {net.n_features} inputs, but MNIST images "
                           f"have {X_test.shape[1]} pixels")
    if net.n_classes is None:
        # a regression: scored on the digit values as targets
        if net.n_outputs != 1:
            raise CommandError(f"model {path} predicts {net.n_outputs} values per image, but "
                               f"MNIST has one label per image")
        if args.plot is not None:
            raise CommandError("--plot draws misclassified images; model "
                               f"{path} is a regression")
    elif len(y_test) and net.n_classes <= int(y_test.max()):
        raise CommandError(f"model {path} has {net.n_classes} classes, but MNIST has 10")
    print(f"model {path}: {_describe(net)}\n{net.summary()}")
    _check_plot(args.plot)
    if net.n_classes is None:
        loss, r2 = net.evaluate(X_test, y_test.astype("float32"), n_threads=args.threads)
        print(f"test R^2 {r2:.4f} (squared error {loss:.4f}) on {len(X_test)} images")
        return EXIT_OK
    loss, accuracy = net.evaluate(X_test, y_test, n_threads=args.threads)
    print(_result_line(loss, accuracy, len(X_test)))
    if args.plot is not None:
        from .plotting import plot_errors
        plot_errors(net, X_test, y_test, args.plot, title=f"{path.name} on MNIST test images")
        print(f"errors drawn to {args.plot}")
    return EXIT_OK


_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")


def _read_network(path, unsafe_pickle):
    """The Network in `path`: a model file, ONNX, or (if allowed) a pickled MLPClassifier."""
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "does not exist"
        raise CommandError(f"source {path} {reason}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return Network.from_onnx(path)
    if suffix in _PICKLE_SUFFIXES:
        if not unsafe_pickle:
            raise CommandError(f"{path} is a pickle, and unpickling runs any code the file "
                               f"holds; pass --unsafe-pickle if you trust it")
        try:
            if suffix == ".joblib":
                import joblib
                estimator = joblib.load(path)
            else:
                import pickle
                with open(path, "rb") as f:
                    estimator = pickle.load(f)
        except Exception as exc:   # a pickle can fail in any way its code chooses
            raise CommandError(f"cannot unpickle {path}: {_one_line(exc)}") from None
        return Network.from_sklearn(estimator)
    return Network.load(path)


def _convert(args):
    target = args.target
    suffix = target.suffix.lower()
    if suffix not in (".cnn", ".onnx"):
        raise CommandError(f"cannot tell the format of {target}: name it .cnn (cnn_core "
                           f"model file) or .onnx")
    _check_output(target)
    net = _read_network(args.source, args.unsafe_pickle)
    if suffix == ".onnx":
        from .interop import LABEL, OPSET, PROBABILITIES, VARIABLE
        net.to_onnx(target)
        outputs = (LABEL, PROBABILITIES) if net.loss == "cross_entropy" else (VARIABLE,)
        kind = f"ONNX, opset {OPSET}, input 'input', outputs {', '.join(map(repr, outputs))}"
    else:
        net.save(target)
        kind = "cnn_core model file"
    print(f"converted {args.source} ({_describe(net)}) to {target} ({kind})")
    return EXIT_OK


def _info(args):
    if args.model is not None:
        net = _load_model(args.model)
        print(f"model {args.model}: {_describe(net)}\n{net.summary()}")
        return EXIT_OK
    for key, value in cnn_core.info().items():
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        print(f"{key}: {value}")
    return EXIT_OK


_COMMANDS = {"train": _train, "evaluate": _evaluate, "convert": _convert, "info": _info}


def _one_line(exc):
    """An exception's message on one line (some messages list several causes)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _error(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv=None):
    """Run the cnn-core command with `argv` (default: sys.argv[1:]); return the exit status."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:   # --help and --version
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        return _COMMANDS[args.command](args)
    except CommandError as exc:
        return _error(exc)
    except KeyboardInterrupt:
        lead = "\n" if sys.stderr.isatty() else ""
        print(f"{lead}{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (e.g. `cnn-core info | head -1`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except MemoryError as exc:
        return _error(f"out of memory{': ' + _one_line(exc) if str(exc) else ''}")
    except (ValueError, TypeError, OSError, ArithmeticError, ImportError) as exc:
        return _error(_one_line(exc))
