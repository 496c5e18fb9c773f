import sys

# The UI starts a run with SIGINT held (ui/runner.py): a Stop sent while Python and its libraries
# load stays pending until the training loop's StopRequest takes it (train/guard.py), so it
# never lands inside a library's initialisation (a KeyboardInterrupt thrown through pybind11
# there aborts the process).
try:
    from stylelora.cli import main
except KeyboardInterrupt:  # a Ctrl-C on the command line while Python starts
    print("stylelora: interrupted while starting", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
