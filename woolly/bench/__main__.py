"""`python -m woolly.bench --child ...` (first token in a new process) and `--summarize ...`."""
import sys

from woolly.bench import _summarize
from woolly.bench.measure import _child

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--summarize":
        sys.exit(_summarize(sys.argv[2:]))
    print("use `woolly bench`", file=sys.stderr)
    sys.exit(2)
