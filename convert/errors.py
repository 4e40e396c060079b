"""Exceptions raised by the conversion tools.

A ``ConversionError`` means the input or the request cannot be converted (missing or damaged file, an
architecture or format the converter does not handle, an output folder it must not overwrite). Its message
is one sentence for a person: it names the file or metadata field concerned and what was expected. The
command-line entry points print it as ``error: <message>`` and exit with status 2.
"""

from __future__ import annotations


class ConversionError(Exception):
    """The conversion was refused or failed because of its input; the message says which and why."""

    #: Exit status used by the command-line tools for this error.
    exit_code: int = 2
