"""closedloop — an open-source Customer Data Platform.

The marketing loop, one package per stage, data flowing one way:
``collect`` → ``identity`` → ``portrait`` → ``tags`` / ``segments`` / ``predict`` →
``activate`` → ``measure``; ``core`` is shared by all, ``api``/``web``/``cli`` are faces.
"""

__version__ = "0.1.0"
