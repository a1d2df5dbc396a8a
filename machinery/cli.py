"""How every script talks to a person: one line for an error, exit codes a shell understands, on/off flags."""
import argparse
import contextlib
import sys


def error_text(e):
    """An exception as one line for an error message: its first line, or its type if it says nothing."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def one_line_errors():
    """What a user sees of a ValueError or OSError: one line on stderr and exit code 1, no traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        sys.exit(f"error: {error_text(e)}")


def check_utf8(text, what):
    """A command-line text that is not UTF-8 reaches Python with its bad bytes as lone surrogates: say so, rather
    than let them turn into U+FFFD in a prompt or fail deep inside a file name."""
    if any("\udc80" <= c <= "\udcff" for c in text):
        raise ValueError(f"{what} is not UTF-8 text: pass it in UTF-8")


def one_line_flag_errors(parser):
    """parser, answering a bad or missing flag as the trainer does: one line on stderr and exit code 1, where argparse
    prints its usage block and exits 2. --help is unchanged."""
    def error(message):
        sys.exit(f"error: {message} (see --help)")
    parser.error = error
    return parser


def run_script(main, interrupted="interrupted"):
    """Run a script's main(): a Ctrl-C ends it with one line and exit code 130, never a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports it


def on_off(text):
    """On/off flags take 1 or 0."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 1 or 0, got {text!r}")
    return text == "1"


def auto_on_off(text):
    """--bf16 takes auto, 1 or 0; the script decides what auto means on the device at hand."""
    if text not in ("auto", "0", "1"):
        raise argparse.ArgumentTypeError(f"expected auto, 1 or 0, got {text!r}")
    return text if text == "auto" else text == "1"


def int_or_auto(text):
    """--batch_size takes a whole number or auto; the run decides what auto means on the device at hand."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None
