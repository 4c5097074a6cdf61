"""Named errors that carry every problem found, so a user fixes them all in one pass.

Every error umeml raises on purpose derives from :class:`UmemlError`::

    UmemlError                       exit code 1 when it ends a command (a data problem, a failed run)
    +-- UsageError                   exit code 2: the command line, or a file it names, is wrong
    |   +-- ConfigError              a configuration file (or a flag overriding it) is malformed
    |   +-- MissingPathError         a path given does not exist or is of the wrong kind (also an OSError)
    +-- DataValidationError          every problem found in a cohort
    +-- FederationError              the federation cannot go on (umeml.server.coordinator)
    |   +-- HandshakeMismatch        sites disagree on schema or version (umeml.federation.protocol)
    |   +-- RunFailed                a deployed Flower run did not complete (umeml.server.deploy)
    +-- BagError                     a feature bag file is unreadable or malformed (umeml.data.bags)
    +-- NoComparablePairsError       a c-index without comparable pairs (also a ValueError)
    +-- ReportError                  a run dir holds nothing to report on (umeml.report.build)
    +-- CertError                    key material cannot be written as asked (umeml.server.certs)
    +-- SiteError                    a site's handler failed, redacted (umeml.client.app)
    +-- SlideError, EncoderError     slide reading, encoders (umeml.client.extract)

Each class lives next to the code that raises it; the categories shared by several packages
(configuration, data, federation) live here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


class UmemlError(Exception):
    """Base class of every error umeml raises on purpose (bad user input, a failed federation).

    ``exit_code`` is the command's exit status when the error ends it (README, "Errors and exit
    codes"): 1 for a data problem or a run that failed, 2 for a usage error.
    """

    exit_code = 1


class UsageError(UmemlError):
    """The command line, or a file it names (config, site file, output folder), is wrong; found
    before any data is read."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file is malformed: the message names the file and the key path."""


class MissingPathError(UsageError, FileNotFoundError):
    """A path named on the command line or in a site file does not exist, or is a file where a
    folder is expected (or the other way round). Also a FileNotFoundError, for callers that
    handle a missing file as such."""


class FederationError(UmemlError):
    """The federation cannot go on (no sites, refused handshakes, no training site left)."""


@dataclass(frozen=True)
class Problem:
    """One problem with user data: where it is (file, row or slide) and which rule it breaks."""

    source: str
    location: str
    rule: str

    def __str__(self) -> str:
        where = f"{self.source}" + (f" [{self.location}]" if self.location else "")
        return f"{where}: {self.rule}"


class DataValidationError(UmemlError):
    """Raised with all problems found in a cohort at once (Opacus-validator style)."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} data problem(s) found:\n{lines}")


def report_input_error(err: Exception, data_message: str) -> int:
    """Print a user-input error for a command line and return its exit code.

    A usage error exits 2 (``error: ...``); bad data exits 1 (``<data_message>: ...``).
    """
    code = getattr(err, "exit_code", 1)
    print(f"error: {err}" if code == 2 else f"{data_message}: {err}", file=sys.stderr)
    return code
