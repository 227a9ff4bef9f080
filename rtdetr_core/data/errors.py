"""The one exception type of the data pipeline."""
from __future__ import annotations


class DataError(ValueError):
    """A problem with a dataset on disk (missing file or folder, malformed annotation file,
    unreadable image).  The message is one line and starts with the offending path."""
