"""The read-only HTTP API over what closedloop computes (``closedloop api``); see ``app``."""
