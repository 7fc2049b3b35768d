"""Run Python code in a child process that SIGKILLs itself right after a chosen function returns:
a crash at an exact point (a step's work done but not recorded, a file written but not renamed),
with nothing of the child's own cleanup running."""

from __future__ import annotations

import os
import subprocess
import sys

DRIVER = """
import importlib, os, signal, sys
module, _, name = sys.argv[1].partition(":")
owner = importlib.import_module(module)
*classes, attr = name.split(".")
for c in classes:
    owner = getattr(owner, c)
original = getattr(owner, attr)
def killed(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(owner, attr, killed)
exec(sys.argv[2])
"""


def run_killed_after(target: str, code: str, env: dict[str, str] | None = None
                     ) -> subprocess.CompletedProcess[str]:
    """Run `code` with `target` (`module:name` or `module:Class.name`) patched to kill the
    process once it has returned."""
    return subprocess.run([sys.executable, "-c", DRIVER, target, code],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)
