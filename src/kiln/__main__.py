import os
import sys

from kiln.cli import main

code = main()
if os.environ.get("TORCHELASTIC_RUN_ID"):
    # a torchrun rank whose work is done (its files written, the process group left after a barrier): exit without
    # the interpreter's teardown, where gloo's threads were seen to abort a finished rank in C++ ("terminate called
    # without an active exception", exit -6) once in a few dozen 2-rank CPU runs, failing a job that had succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
