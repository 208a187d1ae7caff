"""``growlm demo``: an application of the library (its runs, its report, its real text), in a package of its own.

:mod:`growlm.demo.run` trains and scores everything, :mod:`growlm.demo.report` writes what it measured,
:mod:`growlm.demo.data` fetches the real text, and :mod:`growlm.demo.spec` holds the sizes and names the
two share.
"""

from __future__ import annotations

from growlm.demo.run import demo

__all__ = ["demo"]
