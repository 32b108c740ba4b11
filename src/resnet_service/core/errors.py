"""Domain errors with stable codes. No HTTP here: each face maps codes to its statuses in one
table (``asgi/problems.py`` for HTTP, ``faces/oip/errors.py`` for gRPC)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a caller can act on; ``code`` is stable across releases."""

    code: str = "service_error"
    title: str = "Service error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# --- input -----------------------------------------------------------------------------------
class InputError(ServiceError):
    """The caller sent something we will not process."""

    code = "invalid_input"
    title = "Invalid input"


class EmptyUpload(InputError):
    code = "empty_upload"
    title = "Empty upload"


class UploadTooLarge(InputError):
    code = "upload_too_large"
    title = "Upload too large"


class ImageTooLarge(InputError):
    code = "image_too_large"
    title = "Image has too many pixels"


class UnsupportedImage(InputError):
    code = "unsupported_image_format"
    title = "Unsupported image format"


class UndecodableImage(InputError):
    code = "undecodable_image"
    title = "Image could not be decoded"


class UnreadableFile(InputError):
    """A file the tag job listed could not be read: gone since, no permission, a symlink loop
    (no HTTP request can cause it: uploads are never files)."""

    code = "unreadable_file"
    title = "File could not be read"


class RequestTimeout(InputError):
    """The client was too slow sending its request."""

    code = "request_timeout"
    title = "Request timeout"


class InvalidParameter(InputError):
    code = "invalid_parameter"
    title = "Invalid parameter"


class MalformedRequest(InputError):
    """The request itself is unusable (not multipart, broken multipart...)."""

    code = "malformed_request"
    title = "Malformed request"


class MissingField(InputError):
    code = "missing_field"
    title = "Missing field"


class TooManyFiles(InputError):
    code = "too_many_files"
    title = "Too many files"


class InvalidInferRequest(InputError):
    """An Open Inference Protocol request that does not fit the model's inputs."""

    code = "invalid_infer_request"
    title = "Invalid inference request"


class ModelNotFound(InputError):
    """The request names a model or version this replica does not serve."""

    code = "model_not_found"
    title = "Model not found"


class ModelNotNamed(InputError):
    """The request names no model where several are served and none is the default."""

    code = "model_not_named"
    title = "Model not named"


class Unauthorized(ServiceError):
    code = "unauthorized"
    title = "Unauthorized"


class ControlOff(ServiceError):
    """A repository control request where control is not enabled (no admin token, or a
    load/unload outside ``explicit`` mode)."""

    code = "repository_control_off"
    title = "Repository control is off"


class ModelLoadFailed(ServiceError):
    """A model asked to load could not be (its version failed to build or load)."""

    code = "model_load_failed"
    title = "Model load failed"


class OutputUnavailable(ServiceError):
    """The model that would answer cannot give what was asked (an embedding or a class
    activation map from a model built before its graph had those outputs)."""

    code = "output_unavailable"
    title = "Output unavailable for this model"


class DatasetError(InputError):
    """Training or labelled data that cannot be used; the message says what to fix."""

    code = "dataset_invalid"
    title = "Dataset invalid"


# --- capacity --------------------------------------------------------------------------------
class RetryLater(ServiceError):
    """Try again later (or elsewhere); ``retry_after_s`` estimates when."""

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Overloaded(RetryLater):
    """The queue is full."""

    code = "overloaded"
    title = "Service overloaded"


class NotReady(RetryLater):
    code = "not_ready"
    title = "Service not ready"


class ModelCold(NotReady):
    """A model version that is available but not loaded (models on demand): a face that can
    wait loads it and waits within the request's deadline; elsewhere it is a 503 like any
    model still loading."""

    code = "model_not_loaded"
    title = "Model not loaded"

    def __init__(self, detail: str, model: str = "", version: str = "") -> None:
        super().__init__(detail, 2)
        self.model = model
        self.version = version

    @classmethod
    def of(cls, model: str, version: str) -> ModelCold:
        return cls(
            f"Model '{model}' version {version} is loading on request; retry.", model, version
        )


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"
    title = "Deadline exceeded"


class InferenceFailed(ServiceError):
    code = "inference_failed"
    title = "Inference failed"


# --- model -----------------------------------------------------------------------------------
class ModelError(ServiceError):
    code = "model_error"
    title = "Model error"


class WeightsUnavailable(ModelError):
    code = "weights_unavailable"
    title = "Model weights unavailable"


class RuntimeUnavailable(ModelError):
    """The requested inference runtime is not installed or cannot run here."""

    code = "runtime_unavailable"
    title = "Runtime unavailable"


class ArtifactBuildFailed(ModelError):
    """A model for the requested runtime could not be built; the detail says why."""

    code = "artifact_build_failed"
    title = "Model build failed"


class CacheUnwritable(ModelError):
    """The model cache holds no built model for these settings and cannot be written."""

    code = "model_cache_unwritable"
    title = "Model cache not writable"


class BundleInvalid(ModelError):
    code = "bundle_invalid"
    title = "Model bundle invalid"


def error_classes() -> list[type[ServiceError]]:
    """Every domain error class (for the faces' tables and their tests)."""
    found: list[type[ServiceError]] = [ServiceError]
    for cls in found:
        found.extend(sub for sub in cls.__subclasses__() if sub not in found)
    return found


class TagRulesInvalid(ModelError):
    """A tag rules file that cannot be used; the detail names the file, the line and why."""

    code = "tag_rules_invalid"
    title = "Tag rules invalid"
