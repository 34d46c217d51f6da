#!/usr/bin/env python
"""Filter a fairseq-train ``--log-format json`` stream (stdin) into one short progress line per
logged update, plus any error lines::

    fairseq-train ... | tee train.log | python recipes/demo/progress.py NAME TOTAL_UPDATES
"""

import json
import sys


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    name, total = sys.argv[1], int(sys.argv[2])
    for line in sys.stdin:
        if "| train_inner |" in line:
            r = json.loads(line.split("| train_inner |", 1)[1])
            print(f"  {name:7s} update {int(r['num_updates']):5d}/{total}  loss {r['loss']:>7s}  "
                  f"gnorm {r.get('gnorm', '?'):>7s}", flush=True)
        elif "| ERROR |" in line or "Error" in line:
            print(f"  {name:7s} {line.strip()[:160]}", flush=True)


if __name__ == "__main__":
    main()
