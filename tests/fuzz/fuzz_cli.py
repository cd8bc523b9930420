"""Fuzz the command line's file inputs, in process: cnn_core.cli.main(argv).

The first byte of an input picks what the rest is:
    0  the model file of `cnn-core evaluate MODEL --data SMALL_MNIST`
    1  the source of `cnn-core convert SOURCE out.cnn`
    2  the test-image IDX file in the --data folder of `evaluate` with a valid model
Every input must end in cli.EXIT_OK or cli.EXIT_ERROR (an error reported on stderr),
never an exception out of main. SMALL_MNIST and the valid model are made by make_seeds.py from
the real MNIST files.

    python tests/fuzz/fuzz_cli.py CORPUS [libFuzzer options]

with CNN_CORE_FUZZ_FIX_CRC=1 for the structure-aware mode (see common.py).
"""
import contextlib
import functools
import io
import sys
from pathlib import Path

import atheris

from common import Scratch, model_bytes

with atheris.instrument_imports():
    from cnn_core import cli

SEEDS = Path(__file__).resolve().parent / "corpus"
SMALL_MNIST = SEEDS / "small-mnist"
VALID_MODEL = SEEDS / "small-mnist-model.cnn"
TEST_IMAGES = "t10k-images-idx3-ubyte"

# One parser for every input: building argparse's parser costs more than the rest of an
# evaluate on the small data; parsing leaves the parser as it was.
cli.build_parser = functools.lru_cache(maxsize=1)(cli.build_parser)
scratch = Scratch()
mutated_data = scratch.folder / "data"
mutated_data.mkdir()
for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
    (mutated_data / name).symlink_to(SMALL_MNIST / name)


def run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = cli.main([str(a) for a in argv])
        except SystemExit as exc:     # main returns; argparse must not exit past it
            raise AssertionError(f"SystemExit({exc.code}) escaped cli.main") from None
    assert status in (cli.EXIT_OK, cli.EXIT_ERROR), (status, out.getvalue())
    return status


def TestOneInput(data):
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    if mode == 0:
        model = scratch.write("model.cnn", model_bytes(body))
        run(["evaluate", model, "--data", SMALL_MNIST, "--threads", "1"])
    elif mode == 1:
        source = scratch.write("source.cnn", model_bytes(body))
        target = scratch.folder / "target.cnn"
        if run(["convert", source, target]) == cli.EXIT_OK:
            if source.read_bytes()[8:12] == b"\x02\x00\x00\x00":   # version 1 becomes 2
                assert target.read_bytes() == source.read_bytes()
            target.unlink()
    else:
        scratch.write(f"data/{TEST_IMAGES}", body)
        run(["evaluate", VALID_MODEL, "--data", mutated_data, "--threads", "1"])


if __name__ == "__main__":
    if not VALID_MODEL.is_file():
        sys.exit(f"{VALID_MODEL} not found: run tests/fuzz/make_seeds.py first")
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
