"""User-facing errors: bad input ends with one clear message and exit code 2."""


class BenchError(Exception):
    """Bad input detected before any work started (exit code 2)."""

    exit_code = 2


class JobFailed(Exception):
    """A job ran and failed (exit code 1)."""

    exit_code = 1


class NonFiniteLoss(JobFailed):
    """Training produced NaN/inf; the job stops instead of writing garbage."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C); what finished stays, the rest resumes on the next run."""

    exit_code = 130
