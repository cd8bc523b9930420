"""The cnn-core command line: training and evaluating on real MNIST, in-process and
through ``python -m cnn_core``, and one-line errors (exit status 2) for every bad input."""
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import cnn_core
from cnn_core import Network, cli
from cnn_core.cli import main

SPLIT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k-split"
needs_split = pytest.mark.skipif(not SPLIT.is_dir(), reason=f"real MNIST data not found at {SPLIT}")

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) - loss [\d.]+ - accuracy [\d.]+ - "
                        r"val_loss [\d.]+ - val_accuracy ([\d.]+) - [\d.]+s$")
RESULT = re.compile(r"test accuracy (\d\.\d{4}) \(loss (\d+\.\d{4})\) on (\d+) images")


def run(*args, cwd=None):
    """Run ``python -m cnn_core args`` in a subprocess; return the CompletedProcess.

    It runs in a temporary folder unless `cwd` is given, never in the source checkout,
    whose cnn_core/ (not compiled) would shadow the installed package."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    env.pop("CNN_CORE_DATA", None)
    if cwd is None:
        cwd = tempfile.gettempdir()
    return subprocess.run([sys.executable, "-m", "cnn_core", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(code, err, fragment=""):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cnn-core: error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_a_source_folder_shadowing_the_package_is_named_as_such(tmp_path):
    """Python started beside an uncompiled cnn_core/ (the checkout after pip install .)
    imports that folder: the error says so and what to do, not 'circular import'."""
    source = tmp_path / "cnn_core"
    source.mkdir()
    for path in Path(cnn_core.__file__).parent.glob("*.py"):
        (source / path.name).write_bytes(path.read_bytes())
    done = subprocess.run([sys.executable, "-c", "import cnn_core"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"ImportError: {source} is cnn_core's source folder, without the compiled "
                    f"kernels: run Python from another folder (after pip install .), or "
                    f"build in place with pip install -e ."), done.stderr
    assert "circular" not in done.stderr


# ---- help, version, info --------------------------------------------------------------
def test_help_lists_commands_and_train_defaults(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cnn-core") and all(c in out for c in ("train", "evaluate", "info"))
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--data", "--hidden", "--activation", "--epochs", "--batch-size",
                   "--optimizer", "--learning-rate", "--momentum", "--nesterov",
                   "--weight-decay", "--seed", "--threads", "--output", "--no-save"):
        assert option in out
    assert "mnist_mlp.cnn" in out and "(default: 128)" in out


def test_module_help_and_version_in_a_subprocess():
    done = run("--help")
    assert done.returncode == 0 and "usage: cnn-core" in done.stdout and not done.stderr
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"cnn-core {cnn_core.__version__}"


def test_console_script_points_at_main():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    (script,) = [ep for ep in scripts if ep.name == "cnn-core"]
    assert script.value == "cnn_core.cli:main" and script.load() is main


def test_info_prints_build_facts(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    facts = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert facts["version"] == cnn_core.__version__
    assert facts["kernel"] == cnn_core.info()["kernel"]
    assert int(facts["threads"]) == cnn_core.info()["threads"] >= 1


# ---- training and evaluation on real MNIST --------------------------------------------
@needs_split
def test_train_then_evaluate_through_python_m(tmp_path):
    model = tmp_path / "m.cnn"
    done = run("train", "--data", SPLIT, "--epochs", 2, "--hidden", 32, "--output", model,
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.strip().splitlines()
    epochs = [EPOCH_LINE.match(line) for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(epochs)         # one plain line per epoch, no bar
    assert [m.group(1, 2) for m in epochs] == [("1", "2"), ("2", "2")]
    final = RESULT.search(lines[-1])
    assert final and lines[-1].endswith(f"model saved to {model}")
    accuracy = float(final.group(1))
    assert accuracy > 0.85 and final.group(3) == "2000"
    assert float(epochs[-1].group(3)) == pytest.approx(accuracy, abs=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.cnn"]  # no temporary files left

    done = run("evaluate", model, "--data", SPLIT)
    assert done.returncode == 0, done.stderr
    again = RESULT.search(done.stdout)
    assert again and again.group(0) == final.group(0)   # same accuracy and loss
    assert "784-32-10 relu" in done.stdout


@needs_split
def test_train_in_process_with_options(tmp_path, capsys):
    model = tmp_path / "tanh.cnn"
    code = main(["train", "--data", str(SPLIT), "--epochs", "1", "--train-samples", "1000",
                 "--hidden", "24, 16", "--activation", "tanh", "--optimizer", "adam",
                 "--batch-size", "50", "--seed", "3", "--threads", "1", "-o", str(model)])
    out = capsys.readouterr().out
    assert code == 0
    assert "784-24-16-10 tanh on 1000 images" in out
    assert sum(bool(EPOCH_LINE.match(line)) for line in out.splitlines()) == 1
    net = Network.load(model)
    assert net.layer_sizes == [784, 24, 16, 10] and net.activation == "tanh"

    assert main(["evaluate", str(model), "--data", str(SPLIT)]) == 0
    assert RESULT.search(capsys.readouterr().out).group(0) == RESULT.search(out).group(0)


@needs_split
def test_default_output_in_current_folder_and_no_save(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", str(SPLIT), "--epochs", "1", "--train-samples", "300"]
    assert main(args + ["--no-save"]) == 0
    assert "model not saved" in capsys.readouterr().out and not list(tmp_path.iterdir())
    assert main(args) == 0
    assert capsys.readouterr().out.strip().endswith("model saved to mnist_mlp.cnn")
    assert Network.load(tmp_path / "mnist_mlp.cnn").layer_sizes == [784, 128, 10]


@needs_split
def test_data_from_environment_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNN_CORE_DATA", str(SPLIT))
    assert main(["train", "--epochs", "1", "--train-samples", "200", "--hidden", "8",
                 "--output", str(tmp_path / "m.cnn")]) == 0
    assert "on 200 images" in capsys.readouterr().out


# ---- errors ---------------------------------------------------------------------------
@pytest.fixture
def bad_paths(tmp_path):
    """Folders and files that are wrong in different ways."""
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in cnn_core.datasets.MNIST_FILES:
        (corrupt / name).write_bytes(b"not an idx file")
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"x")
    good = tmp_path / "good.cnn"
    Network([784, 4, 10], seed=0).save(good)
    truncated = tmp_path / "truncated.cnn"
    truncated.write_bytes(good.read_bytes()[:-10])
    flipped = bytearray(good.read_bytes())
    flipped[100] ^= 1
    (tmp_path / "flipped.cnn").write_bytes(bytes(flipped))
    Network([5, 4, 10], seed=0).save(tmp_path / "small_input.cnn")
    Network([784, 3], seed=0).save(tmp_path / "three_classes.cnn")
    return tmp_path


TRAIN_ERRORS = [
    (["--hidden", "12,x"], "--hidden"),
    (["--hidden", "0"], "--hidden"),
    (["--hidden", ""], "--hidden"),
    (["--hidden", "64,"], "--hidden"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "2.5"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--momentum", "1"], "--momentum"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--threads", "5000"], "--threads"),
    (["--plot", "curves.txt"], "not .txt"),
    (["--activation", "softplus"], "--activation"),
    (["--optimizer", "rmsprop"], "--optimizer"),
    (["--optimizer", "adam", "--nesterov"], "--nesterov"),
    (["--no-save", "--output", "m.cnn"], "not allowed with"),
    (["--bogus"], "--bogus"),
    (["--data", "{tmp}/missing"], "does not exist"),
    (["--data", "{tmp}/empty"], "lacks"),
    (["--data", "{tmp}/corrupt"], "bad magic"),
    (["--output", "{tmp}/no/such/folder/m.cnn"], "does not exist"),
    (["--output", "{tmp}/a_file/m.cnn"], "is not a folder"),
    (["--output", "{tmp}"], "is a folder"),
]


@pytest.mark.parametrize("extra,fragment", TRAIN_ERRORS)
def test_train_errors_are_one_line_before_any_training(extra, fragment, bad_paths, capsys,
                                                      monkeypatch):
    monkeypatch.chdir(bad_paths)
    data = [] if "--data" in extra else ["--data", str(SPLIT)]
    extra = [arg.replace("{tmp}", str(bad_paths)) for arg in extra]
    epochs = [] if "--epochs" in extra else ["--epochs", "1"]
    code = main(["train", *data, *epochs, *extra])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, fragment)
    assert "epoch" not in out                     # failed before training started
    assert not (bad_paths / "mnist_mlp.cnn").exists()


@pytest.mark.parametrize("model,fragment", [
    ("missing.cnn", "does not exist"),
    (".", "is a folder"),
    ("a_file", "not a cnn_core model file"),
    ("truncated.cnn", "truncated"),
    ("flipped.cnn", "checksum"),
    ("small_input.cnn", "takes 5 inputs"),
    ("three_classes.cnn", "3 classes"),
])
@needs_split
def test_evaluate_errors_are_one_line(model, fragment, bad_paths, capsys):
    code = main(["evaluate", str(bad_paths / model), "--data", str(SPLIT)])
    assert_one_line_error(code, capsys.readouterr().err, fragment)


@needs_split
def test_evaluate_scores_a_regression_on_the_digit_values(tmp_path, capsys):
    (X, y), (X_test, y_test) = cnn_core.load_mnist(SPLIT, download=False, verbose=False)
    net = Network([784, 8, 1], loss="squared_error", seed=0)
    net.fit(X[:500], y[:500].astype(np.float32), epochs=2, learning_rate=0.01)
    net.save(tmp_path / "digits.cnn")
    assert main(["evaluate", str(tmp_path / "digits.cnn"), "--data", str(SPLIT)]) == 0
    loss, r2 = net.evaluate(X_test, y_test.astype(np.float32))
    assert f"test R^2 {r2:.4f} (squared error {loss:.4f}) on 2000 images" in \
        capsys.readouterr().out

    Network([784, 2], loss="squared_error", seed=0).save(tmp_path / "two.cnn")
    code = main(["evaluate", str(tmp_path / "two.cnn"), "--data", str(SPLIT)])
    assert_one_line_error(code, capsys.readouterr().err, "predicts 2 values per image")
    code = main(["evaluate", str(tmp_path / "digits.cnn"), "--data", str(SPLIT),
                 "--plot", str(tmp_path / "p.png")])
    assert_one_line_error(code, capsys.readouterr().err, "is a regression")
    assert not (tmp_path / "p.png").exists()


def test_missing_command_and_unknown_command(capsys):
    assert_one_line_error(main([]), capsys.readouterr().err, "COMMAND")
    assert_one_line_error(main(["fly"]), capsys.readouterr().err, "fly")


@needs_split
def test_errors_through_python_m_exit_2_without_traceback(bad_paths):
    for args, fragment in [
            (["train", "--hidden", "12,x"], "--hidden"),
            (["train", "--epochs", "-3"], "--epochs"),
            (["train", "--data", bad_paths / "missing"], "does not exist"),
            (["train", "--data", SPLIT, "-o", bad_paths / "nope" / "m.cnn"], "does not exist"),
            (["evaluate", bad_paths / "flipped.cnn", "--data", SPLIT], "checksum")]:
        done = run(*args, cwd=bad_paths)
        assert_one_line_error(done.returncode, done.stderr, fragment)
        assert not done.stdout


@needs_split
def test_divergence_is_an_error_not_a_traceback(tmp_path, capsys):
    code = main(["train", "--data", str(SPLIT), "--epochs", "1", "--train-samples", "256",
                 "--learning-rate", "1e30", "-o", str(tmp_path / "m.cnn")])
    assert_one_line_error(code, capsys.readouterr().err, "diverged")
    assert not (tmp_path / "m.cnn").exists()


@needs_split
def test_keyboard_interrupt_exits_130_and_saves_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Network, "fit", interrupted)
    code = main(["train", "--data", str(SPLIT), "-o", str(tmp_path / "m.cnn")])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "cnn-core: interrupted"
    assert not list(tmp_path.iterdir())


def test_download_error_message_is_flattened_to_one_line(monkeypatch, capsys, tmp_path):
    def offline(*args, **kwargs):
        raise cnn_core.datasets.DownloadError("could not download x.gz; mirrors tried:\n"
                                              "  https://example/x.gz: offline\nhint")

    monkeypatch.delenv("CNN_CORE_DATA", raising=False)
    monkeypatch.setattr(cli, "load_mnist", offline)
    code = main(["train", "-o", str(tmp_path / "m.cnn")])
    assert_one_line_error(code, capsys.readouterr().err,
                          "mirrors tried: https://example/x.gz: offline hint "
                          "(On the command line: --data DIR.)")
    assert not list(tmp_path.iterdir())
