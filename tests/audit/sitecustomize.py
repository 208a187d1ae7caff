"""Test-only: record every file a process opens for writing, per data-parallel rank.

Put this directory on PYTHONPATH and set GROWLM_AUDIT_DIR; each process appends the paths it opens
for writing to ``$GROWLM_AUDIT_DIR/rank-$RANK.txt`` (used to prove that only rank 0 writes).
"""

import os
import sys

_dir = os.environ.get("GROWLM_AUDIT_DIR")
if _dir:
    _log = os.path.join(_dir, f"rank-{os.environ.get('RANK', 'none')}.txt")

    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], str) and not args[0].startswith(_dir):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                with open(_log, "a") as f:
                    f.write(args[0] + "\n")
        elif event in ("os.rename", "os.replace", "os.mkdir") and args:
            with open(_log, "a") as f:
                f.write(f"{event} {args[1] if event != 'os.mkdir' else args[0]}\n")

    sys.addaudithook(_hook)
