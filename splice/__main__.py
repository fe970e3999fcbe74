import sys


def _forget_interrupt() -> None:
    """CPython remembers a KeyboardInterrupt that escaped code run through PyRun_String (which
    C extensions use while they are imported) and, at exit, kills the process with SIGINT in place
    of its exit code, even when the interrupt was handled. Running an empty string through that
    entry point clears the flag, so a Ctrl-C splice handled ends with 130 as it says."""
    import ctypes

    ctypes.pythonapi.PyRun_SimpleString(b"")


try:
    from .cli import main
except KeyboardInterrupt:   # Ctrl-C while the CLI itself is imported: the same message as later
    print("splice: interrupted", file=sys.stderr)
    code = 130
else:
    code = main()
if code == 130:
    _forget_interrupt()
sys.exit(code)
