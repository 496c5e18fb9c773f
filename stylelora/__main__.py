import signal
import sys

try:
    # The UI starts a run with SIGINT held (ui/runner.py): a Stop while Python itself starts
    # waits until here, where it is a KeyboardInterrupt like a Ctrl-C at any later moment.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    from stylelora.cli import main
except KeyboardInterrupt:
    print("stylelora: interrupted while starting", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
