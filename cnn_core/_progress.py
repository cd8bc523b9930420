"""Progress display for long work: a live bar on a terminal, one line per step otherwise."""
import sys
import time


def _duration(seconds):
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}:{seconds % 60:02d}"


class EpochProgress:
    """Shows progress through one epoch of `total` samples and prints its summary line.

    On a terminal the bar is redrawn in place (samples/s, ETA, running loss); elsewhere
    only the summary line is printed, so logs stay readable.
    """

    def __init__(self, epoch, epochs, total, file=None):
        self.file = file if file is not None else sys.stdout
        self.live = hasattr(self.file, "isatty") and self.file.isatty()
        self.prefix = f"epoch {epoch}/{epochs}"
        self.total = total
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def update(self, done, running_loss):
        """Redraw the bar (at most ten times a second) after `done` samples."""
        if not self.live:
            return
        now = time.perf_counter()
        if now - self.last_draw < 0.1 and done < self.total:
            return
        self.last_draw = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        self.file.write(f"\r{self.prefix} [{bar}] {done}/{self.total} "
                        f"{rate:,.0f} samples/s ETA {_duration(eta)} loss {running_loss:.4f}\x1b[K")
        self.file.flush()

    def finish(self, record):
        """Print the epoch's summary line from a history record."""
        parts = [self.prefix, f"loss {record['loss']:.4f}", f"accuracy {record['accuracy']:.4f}"]
        if "val_loss" in record:
            parts += [f"val_loss {record['val_loss']:.4f}",
                      f"val_accuracy {record['val_accuracy']:.4f}"]
        parts.append(f"{record['seconds']:.2f}s")
        self.file.write(("\r" if self.live else "") + " - ".join(parts)
                        + ("\x1b[K" if self.live else "") + "\n")
        self.file.flush()
