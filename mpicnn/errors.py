"""The one error type users see: a message that says what went wrong and what to do."""


class MpicnnError(Exception):
    """A user-facing failure, reported as one line ``mpicnn: error: <message>``.

    ``collective=True`` means every rank detected the same failure (config parsing,
    agreed validation), so rank 0 alone reports it and all ranks exit together
    instead of aborting the job.
    """

    exit_code = 2

    def __init__(self, message: str, *, collective: bool = False):
        super().__init__(message)
        self.collective = collective
