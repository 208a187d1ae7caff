"""``growlm demo``: an application of the library (its runs, its report, its real text), in a package of its own.

:mod:`growlm.demo.run` trains and scores everything, :mod:`growlm.demo.report` writes what it measured,
:mod:`growlm.demo.data` fetches the real text, and :mod:`growlm.demo.spec` holds the sizes and names the
two share. :mod:`growlm.demo.study` (``growlm demo --study growth``) compares growth schedules at equal tokens
by the training FLOPs each needs to reach the monolithic model's loss; :mod:`growlm.demo.study_report` writes
its report.
"""

from __future__ import annotations

from growlm.demo.run import demo
from growlm.demo.study import growth_study

__all__ = ["demo", "growth_study"]
