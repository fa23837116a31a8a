"""Exception types shared by the library.

Every error the pipeline raises on purpose derives from ``ModerationError``
so the CLI can print its message (which says what to do next) without a
traceback.
"""


class ModerationError(Exception):
    """Base class: a failure with a message meant for the operator."""


class ConfigError(ModerationError):
    """A setting is missing or invalid; the message names the variable."""


class StoreError(ModerationError):
    """The object store is unreachable or refused an operation."""


class NotFoundError(ModerationError):
    """A requested object, version or record does not exist."""


class IntegrityError(ModerationError):
    """An artifact's bytes do not match the sha256 in its manifest."""


class CorruptPointerError(IntegrityError):
    """A ``CURRENT`` pointer, or the manifest it names, cannot be read.

    Not a NotFoundError: something *was* published, so a caller must not fall
    back to "nothing yet". ``key`` is the broken object; the message names the
    command (and DAG) whose next publish rewrites the pointer.
    """

    def __init__(self, message: str, key: str):
        self.key = key
        super().__init__(message)


class BadImageError(ModerationError):
    """An input file is not a usable image; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class BatchFailedError(ModerationError):
    """Too many images of a batch failed to decode."""


class EmptyBatchError(BatchFailedError):
    """A batch holds no images at all (nothing uploaded for the day yet, or a wrong prefix).

    Not a broken batch: the Airflow task skips instead of failing, and the
    message says how to match the day once its images arrive.
    """


class VersionMismatchError(ModerationError):
    """Artifacts of different model/statistics versions were combined."""


class DatabaseUnavailableError(ModerationError):
    """The review database could not be reached or dropped the connection mid-work."""


class MissingPrerequisiteError(NotFoundError):
    """A job ran before what it needs was produced (statistics before the index, an index before matching).

    Nothing is broken and retrying soon will not help: ``producer`` names the DAG that produces the
    missing piece, and the Airflow task turns this error into a skip that says so.
    """

    def __init__(self, message: str, producer: str):
        self.producer = producer
        super().__init__(message)
