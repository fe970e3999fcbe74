import sys

try:
    from .cli import main
except KeyboardInterrupt:   # Ctrl-C while the CLI itself is imported: the same message as later
    print("splice: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
